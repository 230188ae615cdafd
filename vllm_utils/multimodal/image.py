"""Image files -> the RGB picture HF transformers' `load_image` gives for the same file, so our engine and an
HF reference see the same pixels: the EXIF orientation applied, then PIL's conversion to RGB (which keeps the
stored colour of transparent pixels rather than compositing them, and maps palette, CMYK, 16-bit, 1-bit and
grey images to RGB). Pictures above PIL's decompression-bomb limit are read with a note; above twice that
limit (which HF refuses too) they are an error."""
import os
import warnings

from PIL import Image, ImageOps

from vllm_utils.errors import UserError
from vllm_utils.notes import note_once

_FIX = "pass --input-image a PNG/JPEG/... image file"
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # what HF refuses too


def load_image(path: str, fix: str = _FIX) -> Image.Image:
    """The upright RGB picture in the image file `path`; a UserError names what is wrong with the file, and `fix`
    what to do about it."""
    _check_is_file(path, fix)
    try:
        return _read(path)
    except Image.DecompressionBombError:
        raise UserError(f"image '{path}' has more than {MAX_PIXELS} pixels (twice PIL's "
                        f"decompression-bomb limit); shrink it first (the model resizes it far smaller)") from None
    except PermissionError:
        raise UserError(f"image '{path}' is not readable (permission denied); fix its permissions") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read image '{path}' ({type(e).__name__}); {fix}") from None


def _check_is_file(path: str, fix: str) -> None:
    if os.path.isdir(path):
        hint = "pass the image files in it, one per --input-image" if fix == _FIX else fix
        raise UserError(f"image '{path}' is a folder, not a file; {hint}")
    if not os.path.isfile(path):
        raise UserError(f"image '{path}' does not exist; {fix}")


def _read(path: str) -> Image.Image:
    """What transformers.image_utils.load_image does to a file: orientation from EXIF, then RGB. PIL's multi-line
    DecompressionBombWarning is silenced: `_note_if_large` says it in one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            _note_if_large(path, image.size)
            return ImageOps.exif_transpose(image).convert("RGB")


def _note_if_large(path: str, size: tuple[int, int]) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    pixels = size[0] * size[1]
    if limit is not None and pixels > limit:
        note_once(f"image '{path}' is large ({size[0]}x{size[1]}, {pixels / 1e6:.1f} Mpixels, above PIL's "
                  f"decompression-bomb limit of {limit / 1e6:.1f} Mpixels); reading it anyway")
