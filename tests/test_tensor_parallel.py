"""Tensor parallelism: settings a user can get wrong, and how a TP run ends (the TP=2 equality test is in
test_matches_hf.py)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from vllm_utils.config import EngineConfig
from vllm_utils.engine import resolve as resolve_module
from vllm_utils.engine.resolve import resolve
from vllm_utils.engine.tensor_parallel import WorkerChannel
from vllm_utils.errors import UserError


def test_more_ranks_than_gpus_is_a_clear_error(tiny_llava, monkeypatch):
    monkeypatch.setattr(resolve_module, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="needs 2 cuda devices but 1 are visible"):
        resolve(EngineConfig(tiny_llava, device="cuda", tensor_parallel_size=2))


def test_size_must_divide_heads(tiny_llava):
    with pytest.raises(UserError, match=r"does not divide the attention heads \(4\)"):
        resolve(EngineConfig(tiny_llava, tensor_parallel_size=8))
    resolve(EngineConfig(tiny_llava, tensor_parallel_size=2))  # 4 heads, 2 kv heads: fine


def _tp_cli(model: str, *args: str, tmp: str) -> subprocess.Popen:
    """The CLI at --tensor-parallel-size 2, in its own process group and with Ctrl-C's default action (as a
    terminal runs it, even when these tests run in the background), with its temporary files under `tmp`."""
    command = [sys.executable, "-m", "vllm_utils.benchmark_vision_language", "--model", model,
               "--tensor-parallel-size", "2", "--dtype", "float32", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "TMPDIR": tmp},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _group_is_gone(pgid: int, wait_s: float = 10.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_tp_run_ends_cleanly(tiny_llava, tmp_path):
    run = _tp_cli(tiny_llava, "--perf", "--input-len", "40", "--output-len", "4", "--dtype", "float16",
                  tmp=str(tmp_path))
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"leaked" not in err, err.decode()
    assert err.count(b"note: float16 is slow on CPUs") == 1, "every rank said the same note"
    assert _group_is_gone(run.pid), "a worker outlived the run"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("vllm_utils_tp_")], "the rendezvous folder was left"


def test_ctrl_c_stops_every_rank_with_one_line(tiny_llava, tmp_path):
    run = _tp_cli(tiny_llava, "--perf", "--input-len", "40", "--output-len", "3000", "--max-model-len", "4096",
                  "--num-iters", "100", tmp=str(tmp_path))
    seen, deadline = b"", time.monotonic() + 240
    while b"Generated tokens" not in seen and time.monotonic() < deadline:  # the timed run has started
        chunk = os.read(run.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    assert b"Generated tokens" in seen, seen.decode()
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: every rank gets it
    try:
        _, rest = run.communicate(timeout=120)
    finally:
        if run.poll() is None:  # it ignored Ctrl-C: do not leave it running
            os.killpg(run.pid, signal.SIGKILL)
    err = (seen + rest).decode()
    assert run.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err and "leaked" not in err, err
    assert _group_is_gone(run.pid), "a worker outlived the run"


def test_bad_checkpoint_at_tp_2_is_one_line(tiny_llava, tmp_path):
    """Every rank meets the same error; the user reads it once, with no worker's traceback."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_llava, model)
    weights = next(model.glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["language_model.model.extra.weight"] = torch.zeros(2)
    save_file(tensors, weights, metadata={"format": "pt"})
    run = _tp_cli(str(model), "--perf", "--input-len", "40", "--output-len", "4", tmp=str(tmp_path))
    _, err = run.communicate(timeout=300)
    lines = err.decode().splitlines()
    assert run.returncode == 1
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], err.decode()
    assert "extra.weight" in lines[-1] and "Traceback" not in err.decode()


def test_a_stopped_worker_s_error_is_what_rank_0_reports(tmp_path):
    channel = WorkerChannel(group=None, processes=[SimpleNamespace(exitcode=1)], store_dir=str(tmp_path))
    (tmp_path / "rank1.error").write_text("out of device memory; lower --max-model-len")
    with pytest.raises(UserError, match="^out of device memory; lower --max-model-len$"):
        with channel.watch():
            raise RuntimeError("Connection closed by peer")  # what gloo raises on rank 0
    (tmp_path / "rank1.error").unlink()
    with pytest.raises(UserError, match=r"rank 1 stopped \(exit status 1; its output is above\)"):
        with channel.watch():
            raise RuntimeError("Connection closed by peer")
    channel.processes = [SimpleNamespace(exitcode=None)]  # alive: rank 0's error is its own
    with pytest.raises(RuntimeError, match="rank 0's own"):
        with channel.watch():
            raise RuntimeError("rank 0's own")
    channel.processes = []  # nothing for its exit handler to stop


def test_a_worker_that_dies_before_joining_ends_the_wait():
    """Rank 0 would wait in the group's rendezvous for half an hour for a worker that crashed at start."""
    import threading

    from vllm_utils.engine.tensor_parallel import _join_while_alive

    class DeadWorker:
        exitcode = 1

    from vllm_utils.errors import UserError

    with pytest.raises(UserError, match=r"worker 1 exited \(code 1\) before joining the group"):
        _join_while_alive([DeadWorker()], threading.Event().wait)
