"""`--perf` through the command line: the seed's report, exact lengths, the CSV, errors."""
import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from vllm_utils.config import load_hf_config
from vllm_utils.engine.model_runner import build_model
from vllm_utils.models.llava import LlavaForConditionalGeneration

from conftest import REAL_LLAVA, needs_shared
from test_cli import MODULE, cli

SEED_KEYS = {"latency_num_prompts": "ms", "latency_per_token": "ms", "request_per_second": "requests/s",
             "token_per_second": "tokens/s", "prefill_latency_per_token": "ms", "decode_latency_per_token": "ms"}


def perf_args(model: str, *extra: str) -> list[str]:
    return ["--perf", "--model-type=llava", f"--model={model}", "--tensor-parallel-size=1", "--device", "cpu",
            "--max-model-len=256", "--input-len=100", "--output-len=12", "--num-prompts", "3", "--batch-size=2",
            "--block-size=16", "--dtype=float32", *extra]


def perf_info(stdout: str) -> dict[str, str]:
    start = stdout.index("***Perf Info***") + len("***Perf Info***")
    return json.JSONDecoder().raw_decode(stdout[start:].lstrip())[0]


def value(text: str) -> float:
    return float(text.split()[0])


def test_perf_report_csv_and_json(tiny_llava, tmp_path):
    run = cli(*perf_args(tiny_llava, "--output-json", str(tmp_path / "all.json")), cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    info = perf_info(run.stdout)
    assert set(info) == set(SEED_KEYS)
    for key, unit in SEED_KEYS.items():
        assert info[key].split()[1] == unit and value(info[key]) > 0
    total_ms = value(info["latency_num_prompts"])
    assert value(info["token_per_second"]) * total_ms / 1e3 == pytest.approx(3 * 12, rel=0.01)
    assert value(info["request_per_second"]) * total_ms / 1e3 == pytest.approx(3, rel=0.01)
    assert value(info["latency_per_token"]) == pytest.approx(total_ms / 12, rel=0.01)

    document = json.loads((tmp_path / "all.json").read_text())
    metrics = document["metrics"]
    assert metrics["image_tokens_per_request"] + metrics["text_tokens_per_request"] == 100
    assert metrics["output_tokens"] == 3 * 12
    assert metrics["peak_kv_blocks_used"] <= metrics["kv_blocks_total"]
    assert document["environment"]["torch"] == torch.__version__

    [csv_path] = glob.glob(str(tmp_path / "*.csv"))
    assert len(os.path.basename(csv_path)) == len("YYYYmmddHHMMSS.csv")
    with open(csv_path) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Key", "Value"]
    table = dict(rows[1:])
    for setting, expected in {"input_len": "100", "output_len": "12", "num_prompts": "3", "batch_size": "2",
                              "block_size": "16", "max_model_len": "256", "dtype": "float32",
                              "tensor_parallel_size": "1", "device": "cpu", "model": tiny_llava}.items():
        assert table[setting] == expected
    assert all(table[k] == v for k, v in info.items())


def test_output_len_one_reports_time_to_first_token(tiny_llava, tmp_path):
    run = cli(*perf_args(tiny_llava, "--output-len=1", "--num-prompts=1"), cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    info = perf_info(run.stdout)
    assert value(info["latency_per_token"]) == pytest.approx(value(info["latency_num_prompts"]), rel=0.01)
    assert value(info["decode_latency_per_token"]) == 0


def test_killed_run_leaves_no_csv(tiny_llava, tmp_path):
    args = perf_args(tiny_llava, "--output-len=140", "--num-prompts=40", "--num-iters=5")
    proc = subprocess.Popen([sys.executable, "-m", MODULE, *args], cwd=str(tmp_path), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and "Processed prompts" not in proc.stderr.read(64):
        pass
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("extra, message", [
    (["--input-len=250", "--output-len=10"], "exceeds --max-model-len 256"),
    (["--input-len=10"], "--input-len 10 is shorter than one image"),
    (["--num-prompts=0"], "--num-prompts must be >= 1"),
])
def test_inconsistent_lengths_are_one_line_errors(tiny_llava, tmp_path, extra, message):
    run = cli(*perf_args(tiny_llava, *extra), cwd=str(tmp_path))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not glob.glob(str(tmp_path / "*.csv"))


def test_bundled_7b_config_builds_7b_shapes_on_meta():
    config = load_hf_config("llava-hf/llava-1.5-7b-hf")
    model = build_model(config, LlavaForConditionalGeneration, torch.device("meta"), torch.float16)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["language_model.layers.31.self_attn.qkv_proj.weight"] == (3 * 4096, 4096)
    assert shapes["language_model.layers.0.mlp.gate_up_proj.weight"] == (2 * 11008, 4096)
    assert shapes["lm_head.weight"] == (32064, 4096)
    assert shapes["multi_modal_projector.linear_1.weight"] == (4096, 1024)
    assert len(model.vision_tower.encoder.layers) == 23 and model.num_image_features == 576
    if REAL_LLAVA.is_dir():  # the same shapes as the real model's configuration gives
        real = build_model(load_hf_config(str(REAL_LLAVA)), LlavaForConditionalGeneration, torch.device("meta"),
                           torch.float16)
        assert shapes == {n: tuple(p.shape) for n, p in real.named_parameters()}


def test_dummy_weights_run_from_a_config_only_folder(tiny_llava, tmp_path):
    folder = tmp_path / "config_only"
    folder.mkdir()
    (folder / "config.json").write_text((open(os.path.join(tiny_llava, "config.json")).read()))
    run = cli(*perf_args(str(folder), "--load-format=dummy", "--num-prompts=1"), cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert value(perf_info(run.stdout)["token_per_second"]) > 0


def test_float16_on_cpu_runs_as_bfloat16_and_says_so(tiny_llava, tmp_path):
    args = [a for a in perf_args(tiny_llava, "--num-prompts=1") if a != "--dtype=float32"] + ["--dtype=float16"]
    run = cli(*args, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "float16 is slow on CPUs; using bfloat16" in run.stderr
    [csv_path] = glob.glob(str(tmp_path / "*.csv"))
    with open(csv_path) as f:
        assert dict(csv.reader(f))["dtype"] == "bfloat16"
