"""The command line, run as users run it: output text and the one-line errors."""
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass

import pytest

from vllm_utils.models.registry import MODEL_FAMILIES
from vllm_utils.testing.images import make_demo_image

from conftest import HFReference

MODULE = "vllm_utils.benchmark_vision_language"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env(env: dict | None = None) -> dict:
    """This checkout's package first, whatever another install (e.g. an editable one) says."""
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **(env or {})}


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, cwd: str | None = None, env: dict | None = None) -> Run:
    """The command line as `python3 -m vllm_utils.benchmark_vision_language ARGS` runs it, in this process (its
    `main`, with the output captured and argparse's exits turned into the status): what a new process would print,
    less its seconds of imports. In `cwd`, else a new empty folder (no run leaves a file in the checkout)."""
    from vllm_utils.benchmark_vision_language import main

    out, err = io.StringIO(), io.StringIO()
    here, environ = os.getcwd(), dict(os.environ)
    os.environ.update(env or {})
    os.chdir(cwd or tempfile.mkdtemp(prefix="cli-"))
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse: --help, --version, flag errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(environ)
    return Run(code, out.getvalue(), err.getvalue())


def cli_process(*args: str, cwd: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command line in a process of its own: for what only a new process shows (settings read when the
    package loads, such as OMP_NUM_THREADS)."""
    return subprocess.run([sys.executable, "-m", MODULE, *args], capture_output=True, text=True,
                          cwd=cwd or tempfile.mkdtemp(prefix="cli-"), env=cli_env(env), timeout=300)


def error_lines(run: Run | subprocess.CompletedProcess) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("error:")]


def test_demo_prints_what_hf_generates(tiny_llava, photo):
    from PIL import Image

    run = cli("--demo", "--model-type=llava", f"--model={tiny_llava}", "--device=cpu", f"--input-image={photo}",
              "--prompt=Describe the picture.", "--dtype=float32", "--output-len=20")
    assert run.returncode == 0, run.stderr
    hf = HFReference(tiny_llava)
    prompt = hf.chat_prompt("Describe the picture.")
    text = hf.decode(hf.greedy({"prompt": prompt, "multi_modal_data": {"image": Image.open(photo).convert("RGB")}}, 20))
    assert f"Prompt: {prompt!r}, Generated text: {text!r}, Image: {photo!r}" in run.stdout.splitlines()


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
    "not a llava folder": (lambda t, m, p: ["--model", _non_llava_folder(t)],
                           f"holds a 'llama' model (LlamaForCausalLM), not a {', '.join(list(MODEL_FAMILIES)[:-1])} "
                           f"or {list(MODEL_FAMILIES)[-1]} model; point --model at a checkpoint folder of one of those"),
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


def test_demo_accepts_a_prompt_holding_the_image_placeholder(tiny_llava, photo):
    run = cli("--demo", f"--model={tiny_llava}", "--device=cpu", f"--input-image={photo}", "--output-len=6",
              "--prompt=Describe the picture.", "--prompt=<image>\nDescribe the picture.")
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("Prompt: ")]
    assert len(lines) == 2 and lines[0] == lines[1], "the placeholder should stand where the template puts it"
    assert lines[0].count("<image>") == 1


def test_demo_names_the_image_of_each_line_and_samples_each_request(tiny_llava, photo, tmp_path):
    other = make_demo_image(str(tmp_path / "other.png"), seed=3)
    args = ["--demo", f"--model={tiny_llava}", "--device=cpu", f"--input-image={photo}", f"--input-image={photo}",
            f"--input-image={other}", "--output-len=12", "--temperature=1.5"]
    first, again = cli(*args), cli(*args)
    assert first.returncode == 0, first.stderr
    lines = [line for line in first.stdout.splitlines() if line.startswith("Prompt: ")]
    assert [line.endswith(f"Image: {path!r}") for line, path in zip(lines, [photo, photo, other])] == [True] * 3
    texts = [line.split(", Generated text: ")[1] for line in lines]
    assert texts[0] != texts[1], "two identical requests drew the same sample"
    assert first.stdout == again.stdout, "the same --seed should give the same text"


# Bad input found before any model loads: one line, exit 1, no "Loading the model" phase, no file written.
def _missing_json_folder(t):
    return ["--perf", "--output-json", str(t / "no_such_folder" / "perf.json")]


EARLY_ERRORS = {
    "output-json in a missing folder": (_missing_json_folder, "does not exist"),
    "output-json onto a folder": (lambda t: ["--perf", "--output-json", str(t)], "is a directory"),
    "output-len zero": (lambda t: ["--perf", "--output-len", "0"], "--output-len must be >= 1, got 0"),
    "demo output-len zero": (lambda t: ["--demo", "--output-len=0"], "--output-len must be >= 1, got 0"),
    "temperature nan": (lambda t: ["--demo", "--temperature", "nan"], "--temperature must be a finite number"),
    "temperature inf": (lambda t: ["--demo", "--temperature", "inf"], "--temperature must be a finite number"),
    "two placeholders, one image": (lambda t: ["--demo", "--prompt", "<image> <image> What?"],
                                    "leave them out"),
    "input-len shorter than the image": (lambda t: ["--perf", "--input-len", "17"], "use --input-len >= 18"),
}


@pytest.mark.parametrize("case", sorted(EARLY_ERRORS))
def test_bad_input_is_refused_before_the_model_loads(case, tiny_llava, photo, tmp_path):
    make_args, expected = EARLY_ERRORS[case]
    run = cli(f"--model={tiny_llava}", "--device=cpu", f"--input-image={photo}", *make_args(tmp_path),
              cwd=str(tmp_path))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert len(error_lines(run)) == 1 and expected in error_lines(run)[0], run.stderr
    assert "Loading the model" not in run.stderr
    assert os.listdir(tmp_path) == [], "nothing may be written"


def test_bundled_hub_name_needs_dummy_weights(tmp_path):
    run = cli("--perf", "--model", "llava-hf/llava-1.5-7b-hf", "--device=cpu", cwd=str(tmp_path))
    assert run.returncode == 1 and len(error_lines(run)) == 1, run.stderr
    assert "--load-format dummy" in error_lines(run)[0] and "--model DIR" in error_lines(run)[0]
    assert "Loading the model" not in run.stderr
    assert len(error_lines(run)[0]) < 260


@pytest.mark.parametrize("mode", ["--demo", "--acc"])
def test_a_bundled_config_without_a_tokenizer_is_refused_before_loading_for_text(mode, photo, tmp_path):
    image = [f"--input-image={photo}"] if mode == "--demo" else []
    run = cli(mode, "--model", "Qwen/Qwen2-VL-2B-Instruct", "--load-format=dummy", "--device=cpu", *image,
              cwd=str(tmp_path))
    assert run.returncode == 1 and "Loading the model" not in run.stderr and os.listdir(tmp_path) == []
    assert error_lines(run) == [f"error: --model Qwen/Qwen2-VL-2B-Instruct has no tokenizer files, and {mode} "
                                f"tokenizes text: point --model at the complete model folder (only --perf runs "
                                f"without them, with --load-format dummy)"]


def test_a_folder_with_a_config_alone_points_at_dummy_weights(tiny_llava, tmp_path):
    folder = tmp_path / "config_only"
    folder.mkdir()
    shutil.copy(os.path.join(tiny_llava, "config.json"), folder)
    run = cli("--perf", f"--model={folder}", "--device=cpu", cwd=str(tmp_path))
    assert run.returncode == 1 and "Loading the model" not in run.stderr
    assert error_lines(run) == [f"error: '{folder}' lacks usable tokenizer/processor files (no tokenizer_config.json "
                                f"or preprocessor_config.json); use the complete Hugging Face model folder, or "
                                f"--load-format dummy for --perf on its config alone"]


def test_7b_input_len_is_checked_from_its_config_alone(tmp_path):
    run = cli("--perf", "--model", "llava-hf/llava-1.5-7b-hf", "--load-format=dummy", "--device=cpu",
              "--input-len=500", cwd=str(tmp_path))
    assert run.returncode == 1 and "Loading the model" not in run.stderr
    assert error_lines(run) == ["error: --input-len 500 is shorter than the request's images (576 positions) plus BOS and "
                                "one text token; use --input-len >= 578"]


@pytest.fixture
def unwritable_folder(tmp_path) -> str:
    """A folder no file can be created in, even by root (who ignores permission bits)."""
    if os.geteuid() == 0:
        return "/proc"
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o555)
    return str(folder)


def test_unwritable_csv_folder_is_refused_before_the_model_loads(tiny_llava, unwritable_folder):
    run = cli("--perf", f"--model={tiny_llava}", "--device=cpu", "--input-len=100", cwd=unwritable_folder)
    assert run.returncode == 1 and "Loading the model" not in run.stderr
    assert len(error_lines(run)) == 1 and "cannot write the result CSV" in error_lines(run)[0], run.stderr


@pytest.mark.parametrize("args", [["--perf", "--no-such-flag"], ["--input-len=3"], ["--perf", "--num-prompts=x"],
                                  ["--demo", "--perf"]])
def test_flag_errors_are_one_line_and_exit_1(args):
    run = cli(*args)
    assert run.returncode == 1
    assert run.stderr.splitlines() == error_lines(run) and len(error_lines(run)) == 1, run.stderr


def test_help_lists_every_flag_with_help_and_the_bundled_models_without_importing_torch():
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", MODULE, "--help"], capture_output=True,
                         text=True, env=cli_env(), timeout=60)
    assert run.returncode == 0
    imported = {line.split("|")[-1].strip().split(".")[0] for line in run.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "transformers", "numpy", "PIL"}, "--help should not wait for heavy imports"
    from vllm_utils.benchmark_vision_language import build_parser

    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
    assert "llava-hf/llava-1.5-7b-hf" in run.stdout
    for shown in ("(default: 1024)", "(default: 16)", "(default: auto)", "(default: 0)", "(default: 0.0)"):
        assert shown in " ".join(run.stdout.split()), shown
