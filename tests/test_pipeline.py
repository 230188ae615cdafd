"""The command line's pipeline (spec -> plan -> backend -> mode -> report): flags of another mode, checks that
need no weights, result files, the processor and platform built once per run, each family's default model."""
import csv
import glob
import os

import pytest

from test_cli import cli, error_lines


def _refused_before_loading(run, tmp_path, words: str) -> None:
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert len(error_lines(run)) == 1 and words in error_lines(run)[0], run.stderr
    assert "Loading the model" not in run.stderr
    assert not [p for p in os.listdir(tmp_path) if not p.startswith("exists")], "nothing may be written"


# flags given to a mode they do not apply to: refused, the same way for every flag and mode
OTHER_MODES = {
    "acc --temperature": (["--acc", "--temperature=0.7"], "--temperature applies to --demo only; drop it for --acc"),
    "acc --input-len": (["--acc", "--input-len=50"], "--input-len applies to --perf only; drop it for --acc"),
    "perf --temperature": (["--perf", "--temperature=0.5"], "--temperature applies to --demo only; drop it for --perf"),
    "perf --prompt": (["--perf", "--prompt=hi"], "--prompt applies to --demo only; drop it for --perf"),
    "demo --input-len": (["--demo", "--input-len=50"], "--input-len applies to --perf only; drop it for --demo"),
    "demo --num-prompts": (["--demo", "--num-prompts=2"],
                           "--num-prompts applies to --perf and --acc only; drop it for --demo"),
    "demo --dataset": (["--demo", "--dataset=sample-mmmu"], "--dataset applies to --acc only; drop it for --demo"),
    "demo --output-json": (["--demo", "--output-json=x.json"],
                           "--output-json applies to --perf and --acc only; drop it for --demo"),
    "perf --reference": (["--perf", "--reference=hf"], "--reference applies to --demo and --acc only"),
    "acc --input-video": (["--acc", "--input-video=x.mp4"], "--input-video applies to --demo and --perf only"),
    "reference-dtype alone": (["--demo", "--reference-dtype=bfloat16"], "add --reference hf or drop it"),
}
# values no weights are needed to refuse
BAD_VALUES = {
    "negative seed": (["--perf", "--seed=-1"], "--seed must be between 0 and 4294967295, got -1"),
    "huge seed": (["--perf", "--seed=99999999999999999999"], "--seed must be between 0 and 4294967295"),
    "reference dtype": (["--demo", "--reference=hf", "--reference-dtype=bf16"], "unknown --reference-dtype 'bf16'"),
    "huge vision shape": (["--perf", "--input-vision-shape=100000,100000"], "--input-vision-shape 100000,100000 has"),
    "block larger than any sequence": (["--perf", "--block-size=100000", "--max-model-len=512", "--input-len=100",
                                        "--output-len=4"], "--block-size 100000 is larger than the longest sequence"),
    "two images for one per request": (["--perf", "--input-image={photo}", "--input-image={photo}"],
                                       "pass one --input-image (or raise --mm-per-prompt), not 2"),
    "three images for two per request": (["--perf", "--mm-per-prompt=2"] + ["--input-image={photo}"] * 3,
                                         "pass one --input-image (used for each) or 2, not 3"),
    "video with two images per request": (["--perf", "--num-frames=4", "--mm-per-prompt=2"],
                                          "a video request carries one video"),
    "demo frames without a video": (["--demo", "--num-frames=4"], "give --input-video or drop --num-frames"),
    "top-p while greedy": (["--demo", "--top-p=0.5"], "--top-p shapes sampling, and --temperature 0 is greedy"),
    "result-filename a path": (["--perf", "--result-filename=/tmp/x.csv"], "must be a file name, inside --result-dir"),
    "result-filename empty": (["--perf", "--result-filename="], "must be a file name"),
    "unknown dtype": (["--demo", "--dtype=fp16"], "unknown --dtype 'fp16'"),
    "model is a file": (["--demo", "--model={photo}"], "is a file; give the model's folder"),
    "vision shape beside images": (["--perf", "--input-image={photo}", "--input-vision-shape=60,60"],
                                   "--input-vision-shape sizes synthetic images, and --input-image gives real ones"),
    "top-p": (["--demo", "--temperature=1", "--top-p=0"], "--top-p must be in (0, 1], got 0.0"),
    "top-k": (["--demo", "--temperature=1", "--top-k=0"], "--top-k must be -1 (all tokens) or >= 1, got 0"),
    "output-json exists": (["--perf", "--output-json={tmp}/exists.json"], "exists and is never overwritten"),
    "result-filename exists": (["--perf", "--result-filename=exists.csv"], "exists and is never overwritten"),
    "save-output exists": (["--acc", "--save-output={tmp}/exists.jsonl"], "exists and is never overwritten"),
    "no result with a name": (["--perf", "--no-save-result", "--result-filename=r.csv"], "drop one"),
    "two results to one file": (["--acc", "--save-output={tmp}/out.json", "--output-json={tmp}/out.json"],
                                "--output-json and --save-output name the same file"),
}


@pytest.mark.parametrize("case", sorted(OTHER_MODES) + sorted(BAD_VALUES))
def test_refused_in_one_line_before_the_model_loads(case, tiny_llava, photo, tmp_path):
    args, words = OTHER_MODES.get(case) or BAD_VALUES[case]
    for name in ("exists.json", "exists.csv", "exists.jsonl"):
        (tmp_path / name).write_text("an earlier result\n")
    args = [a.format(photo=photo, tmp=tmp_path) for a in args]
    run = cli(f"--model={tiny_llava}", "--device=cpu", *args, cwd=str(tmp_path))
    _refused_before_loading(run, tmp_path, words)
    assert all((tmp_path / n).read_text() == "an earlier result\n" for n in ("exists.json", "exists.csv"))


def test_the_reference_device_is_checked_before_loading(tiny_llava, photo, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is there")
    run = cli("--demo", f"--model={tiny_llava}", "--device=cpu", f"--input-image={photo}", "--reference=hf",
              "--reference-device=cuda", cwd=str(tmp_path))
    _refused_before_loading(run, tmp_path, "--reference-device cuda: PyTorch sees no CUDA GPU")


def test_a_missing_optional_package_is_named_before_loading(tiny_llava, tmp_path, monkeypatch):
    """The bundled llava-bench sample is scored by ROUGE-L: without rouge_score, one line before any loading."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rouge_score" else real(name, *a))
    run = cli("--acc", f"--model={tiny_llava}", "--device=cpu", "--dataset=sample-llava-bench", cwd=str(tmp_path))
    _refused_before_loading(run, tmp_path, "needs the `rouge_score` package: pip install 'vllm_utils[acc]'")


def test_a_batch_larger_than_the_requests_takes_the_requests(tiny_llava, tmp_path):
    """--batch-size 100000 with one request: a note, and a cache sized for one sequence, not 100000."""
    args = ["--perf", f"--model={tiny_llava}", "--device=cpu", "--input-len=100", "--output-len=4",
            "--max-model-len=256"]
    run = cli(*args, "--batch-size=100000", "--result-filename=big.csv", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "note: --batch-size 100000 is more than the 1 request(s) of this run" in run.stderr
    table = dict(csv.reader(open(tmp_path / "big.csv")))
    assert table["batch_size"] == "1" and int(table["kv_blocks_total"]) == 256 // 16


def test_result_dir_filename_and_no_result(tiny_llava, tmp_path):
    args = ["--perf", f"--model={tiny_llava}", "--device=cpu", "--input-len=100", "--output-len=4",
            "--max-model-len=256"]
    (tmp_path / "results").mkdir()
    named = cli(*args, f"--result-dir={tmp_path / 'results'}", "--result-filename=run1.csv", cwd=str(tmp_path))
    assert named.returncode == 0, named.stderr
    assert os.listdir(tmp_path / "results") == ["run1.csv"] and f"Saved to {tmp_path / 'results' / 'run1.csv'}" \
        in named.stderr
    table = dict(csv.reader(open(tmp_path / "results" / "run1.csv")))
    # each figure once, as a number: the seed's keys in the unit ***Perf Info*** prints them in
    assert float(table["latency_num_prompts"]) > 0 and "wall_seconds" not in table
    none = cli(*args, "--no-save-result", cwd=str(tmp_path))
    assert none.returncode == 0 and "***Perf Info***" in none.stdout and "Saved to" not in none.stderr
    assert sorted(os.listdir(tmp_path)) == ["results"]


def test_processor_and_platform_are_built_once_per_run(tiny_llava, photo, tmp_path, monkeypatch):
    """Every mode, --reference hf and --backend hf included: one processor adapter, one platform object."""
    from vllm_utils import platforms
    from vllm_utils.multimodal.processor import ProcessorAdapter
    from vllm_utils.platforms.cpu import CpuPlatform

    built = {"processor": 0, "platform": 0}
    processor_init, platform_init = ProcessorAdapter.__init__, CpuPlatform.__init__

    def count(kind, init):
        def counting(self, *args, **kwargs):
            built[kind] += 1
            init(self, *args, **kwargs)
        return counting

    monkeypatch.setattr(ProcessorAdapter, "__init__", count("processor", processor_init))
    monkeypatch.setattr(CpuPlatform, "__init__", count("platform", platform_init))
    common = [f"--model={tiny_llava}", "--device=cpu", "--dtype=float32", "--output-len=4"]
    runs = {"demo": ["--demo", f"--input-image={photo}", "--reference=hf"],
            "demo hf": ["--demo", f"--input-image={photo}", "--backend=hf"],
            "perf": ["--perf", "--input-len=100", "--no-save-result"],
            "perf hf": ["--perf", "--input-len=100", "--no-save-result", "--backend=hf"],
            "acc": ["--acc", "--reference=hf", "--no-save-result"]}
    for name, args in runs.items():
        monkeypatch.setattr(platforms, "_PLATFORMS", {})  # as in a new process
        built.update(processor=0, platform=0)
        run = cli(*args, *common, cwd=str(tmp_path))
        assert run.returncode == 0, run.stderr
        assert built == {"processor": 1, "platform": 1}, name


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "deepseek_vl_hybrid"])
def test_each_family_has_a_default_model(family, tmp_path):
    """--model-type without --model: the family's tiny random model, built once and cached."""
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    first = cli("--demo", f"--model-type={family}", "--device=cpu", "--output-len=4", env=env)
    assert first.returncode == 0, first.stderr
    assert f"built a tiny {family} with RANDOM weights" in first.stderr
    assert first.stdout.count("Generated text: ") == 1
    again = cli("--perf", f"--model-type={family}", "--device=cpu", "--input-len=400", "--output-len=2",
                "--no-save-result", env=env)
    assert again.returncode == 0 and "***Perf Info***" in again.stdout, again.stderr
    assert glob.glob(str(tmp_path / "vllm_utils" / f"tiny-{family}-demo-v1" / "model" / "config.json"))


def test_version_and_help_by_mode():
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("vllm_utils ")
    text = cli("--help").stdout
    for group in ("model and engine (every mode):", "--demo:", "--perf:", "--acc:", "results (--perf, --acc):"):
        assert group in text, group
    assert "--top-p" in text and "--top-k" in text and "--result-dir" in text


def test_a_failed_tensor_parallel_start_leaves_no_worker_and_no_group(tiny_llava, tmp_path):
    """A start that fails after the workers joined (here: a cache too small for one sequence) ends them all, so the
    next engine in this process can start its own group."""
    import multiprocessing

    import torch.distributed as dist

    args = ["--perf", f"--model={tiny_llava}", "--device=cpu", "--input-len=100", "--output-len=4",
            "--tensor-parallel-size=2", "--num-kv-blocks=2", "--max-model-len=256"]
    for _ in range(2):
        run = cli(*args, cwd=str(tmp_path))
        assert run.returncode == 1 and len(error_lines(run)) == 1 and "cannot hold one sequence" in run.stderr
        assert not dist.is_initialized() and not multiprocessing.active_children()


def test_an_engine_run_hands_its_thread_team_back(tiny_llava, tmp_path):
    """The platform outlives the engine; the team that followed the load does not (a later run starts afresh)."""
    import torch

    from vllm_utils.platforms import platform_for

    run = cli("--perf", f"--model={tiny_llava}", "--device=cpu", "--input-len=100", "--output-len=4",
              "--no-save-result", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert platform_for(torch.device("cpu")).team is None


@pytest.mark.parametrize("args", [["--demo", "--device=tpu9"], ["--demo", "--max-model-len=20"],
                                  ["--demo", "--mm-per-prompt=2"], ["--perf", "--input-len=5"]])
def test_an_error_is_the_only_line_even_with_the_default_model(args, tmp_path):
    """The notes of a run (which default model, which picture) are said once it is checked: not before an error."""
    run = cli(*args, env={"XDG_CACHE_HOME": str(tmp_path)}, cwd=str(tmp_path))
    assert run.returncode == 1 and run.stderr.splitlines() == error_lines(run), run.stderr


def test_acc_replies_are_as_long_as_their_metric_allows(tiny_llava):
    """A dataset mixing metrics: each sample gets its own metric's budget (ROUGE 1024, choices 32, ANLS 32), not the
    largest one for all."""
    import argparse

    from vllm_utils.benchmark_vision_language import build_parser, given_flags
    from vllm_utils.modes.plan import make_plan
    from vllm_utils.modes.spec import ACC_OUTPUT_LEN, spec_from_args

    argv = ["--acc", f"--model={tiny_llava}", "--device=cpu", "--dataset=sample-jsonl", "--no-save-result"]
    args: argparse.Namespace = build_parser().parse_args(argv)
    plan = make_plan(spec_from_args(args, given_flags(argv)))
    metrics = [s.metric for s in plan.inputs.samples]
    assert len(set(metrics)) > 1
    assert plan.inputs.output_lens == [ACC_OUTPUT_LEN[m] for m in metrics] and plan.inputs.output_len == "per metric"


def test_the_hf_backend_samples(tiny_llava, photo):
    """--backend hf with a temperature samples as the engine does: seeded, so the same command gives the same text."""
    args = ["--demo", "--backend=hf", f"--model={tiny_llava}", "--device=cpu", f"--input-image={photo}",
            "--temperature=0.8", "--top-k=50", "--output-len=8", "--seed=3"]
    first, again = cli(*args), cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("Generated text: ") == 1 and first.stdout == again.stdout
