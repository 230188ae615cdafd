"""The command line, run as users run it: output text and the one-line errors."""
import json
import os
import subprocess
import sys

import pytest

from vllm_utils.bench.tiny_model import make_demo_image

from conftest import HFReference, SHARED_IMAGES

MODULE = "vllm_utils.benchmark_vision_language"


def cli(*args: str, cwd: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", MODULE, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> str:
    if SHARED_IMAGES.is_dir():
        return str(SHARED_IMAGES / "chelsea.png")
    return make_demo_image(str(tmp_path_factory.mktemp("img") / "photo.png"))


def test_demo_prints_what_hf_generates(tiny_llava, photo):
    from PIL import Image

    run = cli("--demo", "--model-type=llava", f"--model={tiny_llava}", "--device=cpu", f"--input-image={photo}",
              "--prompt=Describe the picture.", "--dtype=float32", "--output-len=20")
    assert run.returncode == 0, run.stderr
    hf = HFReference(tiny_llava)
    prompt = hf.chat_prompt("Describe the picture.")
    tokens = hf.greedy(prompt, [Image.open(photo).convert("RGB")], 20)
    text = hf.processor.tokenizer.decode(tokens, skip_special_tokens=True)
    assert f"Prompt: {prompt!r}, Generated text: {text!r}" in run.stdout.splitlines()


def test_demo_batch_prints_one_line_per_pair(tiny_llava, photo, tmp_path):
    other = make_demo_image(str(tmp_path / "other.png"), seed=3)
    run = cli("--demo", f"--model={tiny_llava}", "--device=cpu", f"--input-image={photo}", f"--input-image={other}",
              "--prompt=Describe the picture.", "--prompt=What colours do you see?", "--output-len=8")
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("Prompt: ")]
    assert len(lines) == 2 and "Describe the picture." in lines[0] and "What colours" in lines[1]


def test_demo_without_model_builds_and_says_so(tmp_path):
    run = cli("--demo", "--device=cpu", "--output-len=4", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    assert "RANDOM weights" in run.stderr and str(tmp_path) in run.stderr
    assert run.stdout.count("Generated text: ") == 1


def _non_llava_folder(tmp_path) -> str:
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return str(folder)


def _not_an_image(tmp_path) -> str:
    path = tmp_path / "broken.jpg"
    path.write_text("this is not a picture")
    return str(path)


BAD_INPUTS = {
    "missing model folder": (lambda t, m, p: ["--model", str(t / "nope")], "does not exist"),
    "not a llava folder": (lambda t, m, p: ["--model", _non_llava_folder(t)], "not a llava model"),
    "unreadable image": (lambda t, m, p: ["--model", m, "--input-image", _not_an_image(t)], "cannot read image"),
    "missing image": (lambda t, m, p: ["--model", m, "--input-image", str(t / "none.png")], "does not exist"),
    "unknown model type": (lambda t, m, p: ["--model", m, "--model-type", "qwen9"], "unknown --model-type"),
    "gcu without plugin": (lambda t, m, p: ["--model", m, "--device", "gcu"], "torch_gcu"),
    "unknown device": (lambda t, m, p: ["--model", m, "--device", "tpu9"], "unknown device"),
    "prompt too long": (lambda t, m, p: ["--model", m, "--max-model-len", "24"], "--max-model-len 24"),
    "tp size not dividing heads": (lambda t, m, p: ["--model", m, "--tensor-parallel-size", "3"], "does not divide"),
    "zero batch size": (lambda t, m, p: ["--model", m, "--batch-size", "0"], "--batch-size must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_one_clear_line(case, tiny_llava, photo, tmp_path):
    make_args, expected = BAD_INPUTS[case]
    args = ["--demo", "--device=cpu", f"--input-image={photo}", *make_args(tmp_path, tiny_llava, photo)]
    run = cli(*args)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], run.stderr


def test_hf_backend_prints_the_same_demo_text(tiny_llava, photo):
    args = ["--demo", f"--model={tiny_llava}", "--device=cpu", f"--input-image={photo}", "--dtype=float32",
            "--output-len=12"]
    ours, hf = cli(*args), cli(*args, "--backend=hf")
    assert ours.returncode == 0 and hf.returncode == 0, ours.stderr + hf.stderr
    lines = [line for line in ours.stdout.splitlines() if line.startswith("Prompt: ")]
    assert len(lines) == 1 and lines == [line for line in hf.stdout.splitlines() if line.startswith("Prompt: ")]
