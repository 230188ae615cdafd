"""Image files as HF transformers' `load_image` reads them: the same pixels, and through the CLI the same text
HF generates; a folder or an oversized picture told in one line."""

import numpy as np
import pytest
from PIL import Image
from transformers.image_utils import load_image as hf_load_image

from vllm_utils.errors import UserError
from vllm_utils.multimodal.image import load_image

from conftest import HFReference
from test_cli import cli

PROMPT = "Describe the picture."
OUTPUT_LEN = 12
W, H = 96, 64  # not square, so a missed EXIF rotation changes the shape


def _picture(w: int = W, h: int = H) -> np.ndarray:
    """Colourful and without symmetry: gradients, a bright disc off-centre, a dark bar in one corner."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, (x * y) % 256], axis=-1)
    rgb[(x - w // 4) ** 2 + (y - h // 3) ** 2 < (h // 5) ** 2] = (250, 200, 30)
    rgb[h - h // 6:, : w // 3] = (20, 40, 160)
    return rgb.astype(np.uint8)


def _rgba(path: str) -> None:
    """The left half fully transparent over colours that are neither black nor white, a half-transparent strip."""
    alpha = np.full((H, W, 1), 255, np.uint8)
    alpha[:, : W // 2] = 0
    alpha[: H // 4, W // 2 :] = 128
    Image.fromarray(np.concatenate([_picture(), alpha], axis=-1), "RGBA").save(path)


def _exif_rotated(path: str, orientation: int) -> None:
    image = Image.fromarray(_picture())
    exif = image.getexif()
    exif[0x0112] = orientation  # Orientation
    image.save(path, exif=exif, quality=95)


def _palette(path: str, transparent: bool) -> None:
    image = Image.fromarray(_picture()).quantize(colors=32, dither=Image.Dither.NONE)
    if transparent:
        # a third of the picture takes one palette entry (a colour neither black nor white), the transparent one
        indices = np.asarray(image).copy()
        indices[:, : W // 3] = indices[H // 2, W // 2]
        image.putdata(indices.ravel().tolist())
        image.save(path, transparency=int(indices[0, 0]))
    else:
        image.save(path)


def _grey16(path: str) -> None:
    grey = _picture().astype(np.uint16).sum(axis=-1) * 85  # 0..65025: most values above 8 bits
    Image.fromarray(grey.astype(np.uint16)).save(path)


def _grey32(path: str) -> None:
    grey = _picture().astype(np.int32).sum(axis=-1) - 200  # mode I, negatives and values above 255 included
    Image.fromarray(grey.astype(np.int32)).save(path)


def _la(path: str) -> None:
    grey = Image.fromarray(_picture()).convert("L")
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, W, dtype=np.uint8), (H, 1)))
    Image.merge("LA", (grey, alpha)).save(path)


PICTURES = {
    "rgba.png": _rgba,
    "exif6.jpg": lambda p: _exif_rotated(p, 6),
    "exif8.jpg": lambda p: _exif_rotated(p, 8),
    "cmyk.jpg": lambda p: Image.fromarray(_picture()).convert("CMYK").save(p, quality=95),
    "grey16.png": _grey16,
    "grey32.tif": _grey32,
    "palette.png": lambda p: _palette(p, transparent=False),
    "palette_transparent.png": lambda p: _palette(p, transparent=True),
    "bilevel.png": lambda p: Image.fromarray(_picture()).convert("1").save(p),
    "la.png": _la,
    "grey.png": lambda p: Image.fromarray(_picture()).convert("L").save(p),
}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pictures")
    paths = {name: str(folder / name) for name in PICTURES}
    for name, write in PICTURES.items():
        write(paths[name])
    return paths


def test_pictures_are_in_the_modes_they_test(pictures):
    modes = {name: Image.open(path).mode for name, path in pictures.items()}
    assert modes == {"rgba.png": "RGBA", "exif6.jpg": "RGB", "exif8.jpg": "RGB", "cmyk.jpg": "CMYK",
                     "grey16.png": "I;16", "grey32.tif": "I", "palette.png": "P", "palette_transparent.png": "P",
                     "bilevel.png": "1", "la.png": "LA", "grey.png": "L"}
    assert "transparency" in Image.open(pictures["palette_transparent.png"]).info


@pytest.mark.parametrize("name", sorted(PICTURES))
def test_same_pixels_as_transformers(pictures, name):
    ours, hf = load_image(pictures[name]), hf_load_image(pictures[name])
    assert ours.mode == "RGB" and ours.size == hf.size
    assert np.array_equal(np.asarray(ours), np.asarray(hf))


def test_exif_orientation_is_applied(pictures):
    assert load_image(pictures["exif6.jpg"]).size == (H, W)


def test_transparent_pixels_keep_their_stored_colour(pictures):
    """transformers' load_image converts RGBA to RGB by dropping alpha, not compositing on white or black."""
    ours = np.asarray(load_image(pictures["rgba.png"]))
    stored = np.asarray(Image.open(pictures["rgba.png"]))[..., :3]
    assert np.array_equal(ours, stored)
    assert not np.all(stored[:, : W // 2] == 255) and not np.all(stored[:, : W // 2] == 0)


# ---- through the CLI: the text HF generates for the image transformers loads ------------------------------

@pytest.fixture(scope="module")
def cli_lines(tiny_llava, pictures) -> dict[str, str]:
    """One CLI run over every picture (one request each): the output line per picture name."""
    names = sorted(PICTURES)
    run = cli("--demo", f"--model={tiny_llava}", "--device=cpu", "--dtype=float32", f"--output-len={OUTPUT_LEN}",
               f"--prompt={PROMPT}", *(f"--input-image={pictures[name]}" for name in names))
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("Prompt: ")]
    assert len(lines) == len(names), run.stdout
    return dict(zip(names, lines))


@pytest.fixture(scope="module")
def hf(tiny_llava) -> HFReference:
    return HFReference(tiny_llava)


@pytest.mark.parametrize("name", sorted(PICTURES))
def test_cli_prints_what_hf_generates_for_the_file(cli_lines, hf, pictures, name):
    prompt = hf.chat_prompt(PROMPT)
    tokens = hf.greedy({"prompt": prompt, "multi_modal_data": {"image": hf_load_image(pictures[name])}}, OUTPUT_LEN)
    text = hf.decode(tokens)
    assert cli_lines[name] == f"Prompt: {prompt!r}, Generated text: {text!r}, Image: {str(pictures[name])!r}"


def test_cli_says_a_folder_is_a_folder(tiny_llava, tmp_path):
    run = cli("--demo", f"--model={tiny_llava}", "--device=cpu", f"--input-image={tmp_path}")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and run.stderr.startswith("error: ")
    assert f"'{tmp_path}' is a folder" in run.stderr


# ---- errors and large pictures -----------------------------------------------------------------------------

def test_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        load_image(str(tmp_path))


def test_picture_over_the_bomb_limit_is_read_with_a_note(pictures, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", W * H - 1)
    image = load_image(pictures["rgba.png"])
    assert image.size == (W, H)
    note = capsys.readouterr().err.strip()
    assert note.startswith("note: ") and "large" in note and len(note.splitlines()) == 1


def test_picture_over_twice_the_bomb_limit_is_a_user_error(pictures, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", W * H // 3)
    with pytest.raises(UserError, match="decompression-bomb limit"):
        load_image(pictures["grey.png"])
