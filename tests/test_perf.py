"""`--perf` through the command line: the seed's report, exact lengths, the CSV, errors."""
import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time
from importlib import metadata

import pytest
import torch

from vllm_utils.config import load_hf_config
from vllm_utils.engine.model_runner import build_model
from vllm_utils.models.llava import LlavaForConditionalGeneration

from conftest import REAL_LLAVA
from test_cli import MODULE, cli, cli_env, cli_process

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
    run = cli_process(*perf_args(tiny_llava, "--output-json", str(tmp_path / "all.json")), cwd=str(tmp_path),
                      env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    info = perf_info(run.stdout)
    assert set(info) == set(SEED_KEYS) | {"cpu_threads"}  # the seed's six, and on CPU the threads it ran
    assert info["cpu_threads"] == 1 and "CPU threads: 1 (OMP_NUM_THREADS=1; " in run.stdout
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
    # synthetic prompts differ from their second token: no block is shared, none of the figures is a cache hit's
    assert metrics["prefix_cache_hit_rate"] == 0 and "prefix-cache hits: 0.0% of prompt tokens" in run.stdout
    environment = document["environment"]
    assert environment["torch"] == torch.__version__ and environment["packages"]["torch"] == metadata.version("torch")
    assert {"torch", "transformers", "vllm_utils", "python"} <= set(environment["packages"])
    assert environment["cpu_cores"] == os.cpu_count() and environment["cpu_threads"] == 1
    assert environment["cpu_threads_source"].startswith("OMP_NUM_THREADS=1; ")
    model_names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")] \
        if os.path.isfile("/proc/cpuinfo") else []
    if model_names:
        assert environment["cpu_model"] == model_names[0]

    [csv_path] = glob.glob(str(tmp_path / "*.csv"))
    assert len(os.path.basename(csv_path)) == len("YYYYmmddHHMMSS.csv")
    with open(csv_path) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Key", "Value"]
    table = dict(rows[1:])
    for setting, expected in {"input_len": "100", "output_len": "12", "num_prompts": "3", "batch_size": "2",
                              "block_size": "16", "max_model_len": "256", "dtype": "float32",
                              "tensor_parallel_size": "1", "device": "cpu", "model": tiny_llava,
                              "num_kv_blocks": "auto", "max_num_batched_tokens": "8192",
                              "enable_prefix_caching": "True"}.items():
        assert table[setting] == expected
    # the seed's keys hold the numbers ***Perf Info*** prints, without their units
    assert all(float(table[k]) == value(str(v)) for k, v in info.items())


def test_output_len_one_reports_time_to_first_token(tiny_llava, tmp_path):
    run = cli(*perf_args(tiny_llava, "--output-len=1", "--num-prompts=1"), cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    info = perf_info(run.stdout)
    assert value(info["latency_per_token"]) == pytest.approx(value(info["latency_num_prompts"]), rel=0.01)
    assert value(info["decode_latency_per_token"]) == 0


def test_killed_run_leaves_no_csv(tiny_llava, tmp_path):
    args = perf_args(tiny_llava, "--output-len=140", "--num-prompts=40", "--num-iters=5")
    proc = subprocess.Popen([sys.executable, "-m", MODULE, *args], cwd=str(tmp_path), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=cli_env({"VLLM_UTILS_PROGRESS_INTERVAL": "0"}))
    deadline = time.time() + 120
    while time.time() < deadline and "Generated tokens" not in proc.stderr.read(64):
        pass
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("extra, message", [
    (["--input-len=250", "--output-len=10"], "exceeds --max-model-len 256"),
    (["--input-len=10"], "--input-len 10 is shorter than the request's images"),
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


def _csvs(folder) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.csv")))


def test_a_second_run_in_the_same_second_writes_a_second_csv(tiny_llava, tmp_path):
    first = cli(*perf_args(tiny_llava, "--num-prompts=1"), cwd=str(tmp_path))
    assert first.returncode == 0, first.stderr
    [mine] = _csvs(tmp_path)
    # Every name the next run could take in the coming minutes is already taken, as if it had finished in
    # the same second as another run.
    now = time.time()
    taken = {time.strftime("%Y%m%d%H%M%S", time.localtime(now + s)) + ".csv" for s in range(-1, 300)} - {mine}
    for name in taken:
        (tmp_path / name).write_text("another run's result\n")
    second = cli(*perf_args(tiny_llava, "--num-prompts=1"), cwd=str(tmp_path))
    assert second.returncode == 0, second.stderr
    [new] = set(_csvs(tmp_path)) - taken - {mine}
    assert new.endswith("-1.csv") and new[: -len("-1.csv")] + ".csv" in taken | {mine}
    assert all((tmp_path / name).read_text() == "another run's result\n" for name in taken)
    assert f"Saved to ./{new}" in second.stderr


def test_concurrent_csv_writers_never_share_a_name(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from vllm_utils.modes import files

    monkeypatch.setattr(files.time, "strftime", lambda fmt: "20260101000000")
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda i: files.write_csv({"run": i}, str(tmp_path)), range(8)))
    assert len(set(paths)) == 8 and _csvs(tmp_path) == sorted(os.path.basename(p) for p in paths)
    assert sorted(dict(csv.reader(open(p)))["run"] for p in paths) == [str(i) for i in range(8)]
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_a_report_that_cannot_be_written_loses_no_other(tmp_path, monkeypatch):
    from vllm_utils.modes.report import save_reports
    from vllm_utils.modes.spec import ReportSpec

    def where(json_path: str) -> ReportSpec:
        return ReportSpec(save_result=True, result_dir=".", result_filename=None, output_json=json_path)
    from vllm_utils.errors import UserError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"could not write --output-json .*figures printed above are complete"):
        save_reports(where(str(tmp_path / "removed_meanwhile" / "perf.json")), {"a": 1}, lambda: {"a": 1})
    [csv_name] = _csvs(tmp_path)  # the CSV was still written
    os.chmod(tmp_path, 0o555) if os.geteuid() else monkeypatch.chdir("/proc")
    try:
        with pytest.raises(UserError, match=r"could not write the result CSV"):
            save_reports(where(str(tmp_path.parent / f"{tmp_path.name}.json")), {"a": 1}, lambda: {"a": 1})
    finally:
        os.chmod(tmp_path, 0o755)
    assert json.loads((tmp_path.parent / f"{tmp_path.name}.json").read_text()) == {"a": 1}


def test_progress_to_a_file_is_whole_lines(tiny_llava, tmp_path):
    """Off a terminal, each update is one line (here one per update: interval 0), never a '\\r' stream."""
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        run = subprocess.run([sys.executable, "-m", MODULE, *perf_args(tiny_llava, "--output-len=40")],
                             stdout=subprocess.PIPE, stderr=stderr, cwd=str(tmp_path), timeout=300,
                             env=cli_env({"VLLM_UTILS_PROGRESS_INTERVAL": "0"}))
    assert run.returncode == 0
    text = log.read_text()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    for phase in ("Loading the model", "Loading weights", "Warm-up", "Timed run 1/1"):
        assert any(line.startswith(phase) for line in lines), phase
    bars = [line for line in lines if line.startswith("Generated tokens")]
    assert len(bars) > 3 and len(set(bars)) == len(bars), "one line per update, each printed once"
    assert "tok/s" in bars[-1] and "120/120" in bars[-1] and "prompts 3/3" in bars[-1]


def test_progress_is_throttled_in_a_file(tmp_path):
    from vllm_utils.progress import progress_bar

    class Clock:
        now = 0.0

    with open(tmp_path / "log", "w") as f:
        sys_stderr, sys.stderr = sys.stderr, f
        try:
            bar = progress_bar(total=100, desc="work")
            bar._time = lambda: Clock.now  # tqdm's clock, made fake: 0.5 s per update
            bar.start_t = bar.last_print_t = 0.0
            for _ in range(100):
                Clock.now += 0.5
                bar.update(1)
            bar.close()
        finally:
            sys.stderr = sys_stderr
    lines = (tmp_path / "log").read_text().splitlines()
    assert 3 <= len(lines) <= 7, lines  # 50 s at one line per 10 s, and the last


def test_hf_backend_says_n_a_and_which_flags_it_ignores(tiny_llava, tmp_path):
    run = cli(*perf_args(tiny_llava, "--backend=hf", "--num-kv-blocks=64", "--num-prompts=1"), cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    notes = [line for line in run.stderr.splitlines() if "ignores" in line]
    assert notes == ["note: --backend hf ignores the engine-only flags --block-size, --num-kv-blocks"]
    assert "KV-cache blocks used at peak: n/a;" in run.stdout and "0 of 0" not in run.stdout
    [csv_path] = glob.glob(str(tmp_path / "*.csv"))
    table = dict(csv.reader(open(csv_path)))
    assert table["kv_blocks_total"] == "n/a" and table["peak_kv_blocks_used"] == "n/a"
    quiet = cli(*[a for a in perf_args(tiny_llava, "--backend=hf", "--num-prompts=1") if a != "--block-size=16"],
                cwd=str(tmp_path))
    assert quiet.returncode == 0 and "ignores" not in quiet.stderr
