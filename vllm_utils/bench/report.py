"""Writing results: the seed's CSV (Key,Value rows) under a name no other run can take, and a full JSON,
both atomically; the checks that their places are writable, run before any model loads; and the
environment a figure was measured in."""
import csv
import io
import json
import os
import platform
import subprocess
import tempfile
import threading
import time

from vllm_utils import threads
from vllm_utils.errors import UserError


def probe_folder(folder: str, what: str, fix: str = "choose a writable folder") -> None:
    """Raises a UserError unless a file can be created in `folder` (tried, not guessed from permissions)."""
    if not os.path.isdir(folder):
        raise UserError(f"the folder '{folder}' for {what} does not exist; create it or choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".vllm_utils-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write {what} in '{folder}' ({e.strerror}); {fix}") from None


def check_output_json(path: str) -> None:
    if os.path.isdir(path):
        raise UserError(f"--output-json '{path}' is a directory; give a file path such as {os.path.join(path, 'perf.json')}")
    probe_folder(os.path.dirname(os.path.abspath(path)), "--output-json")


def atomic_write(path: str, text: str) -> None:
    """Temp file in the same folder + rename: readers see the old file or the whole new one, never half."""
    tmp = _write_temp(os.path.dirname(os.path.abspath(path)), os.path.basename(path), text)
    try:
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_temp(folder: str, name: str, text: str) -> str:
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def csv_text(rows: dict[str, object]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["Key", "Value"])
    writer.writerows(rows.items())
    return buf.getvalue()


def unique_names(folder: str, stamp: str):
    """`stamp.csv`, then `stamp-1.csv`, `stamp-2.csv`, ..."""
    yield os.path.join(folder, f"{stamp}.csv")
    n = 1
    while True:
        yield os.path.join(folder, f"{stamp}-{n}.csv")
        n += 1


def write_csv(rows: dict[str, object], folder: str = ".") -> str:
    """The seed's `YYYYmmddHHMMSS.csv`, or `...-N.csv` when that name is taken: the name is claimed by an
    exclusive hard link of the complete file, so no run ever overwrites another's, even at the same time."""
    text = csv_text(rows)
    tmp = _write_temp(os.path.abspath(folder), "result.csv", text)
    try:
        for path in unique_names(folder, time.strftime("%Y%m%d%H%M%S")):
            try:
                _claim(tmp, path, text)
                return path
            except FileExistsError:
                continue
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    raise AssertionError("unreachable")


def _claim(tmp: str, path: str, text: str) -> None:
    """Makes `path` hold `text` if no file has that name yet; FileExistsError otherwise."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: exclusive create, then write
        with open(path, "x", newline="") as f:
            f.write(text)


def write_json(path: str, document: dict) -> str:
    atomic_write(path, json.dumps(document, indent=2) + "\n")
    return path


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().strip()
    except OSError:
        return None


def package_versions() -> dict[str, str]:
    from importlib import metadata

    import vllm_utils

    versions = {"python": platform.python_version(), "vllm_utils": vllm_utils.__version__}
    for name in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "triton"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass  # triton: only where installed
    return versions


def environment(device) -> dict[str, object]:
    """Enough to trace a figure to its machine: CPU model, cores and threads used, GPU and driver, versions."""
    import torch

    packages = package_versions()
    env: dict[str, object] = {
        "torch": torch.__version__, "python": packages["python"], "host": platform.machine(),
        "os": platform.platform(), "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_threads": torch.get_num_threads(), "device": str(device), "packages": packages,
    }
    if device.type == "cpu":
        env["cpu_threads_source"] = threads.describe(torch.get_num_threads())
    if device.type == "cuda":
        env.update(gpu_name=torch.cuda.get_device_name(device), gpu_driver=gpu_driver(),
                   cuda_runtime=torch.version.cuda, gpu_count=torch.cuda.device_count())
        env["device_name"] = env["gpu_name"]
    else:
        env["device_name"] = env["cpu_model"]
    return env


def flatten(summary: dict, prefix: str = "") -> dict[str, object]:
    """Nested figures as the CSV's Key,Value rows: keys joined by "_", floats to 4 places, None as "n/a"."""
    flat = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}_"))
        else:
            flat[prefix + key] = "n/a" if value is None else round(value, 4) if isinstance(value, float) else value
    return flat
