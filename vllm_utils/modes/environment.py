"""The environment a figure was measured in: enough to trace it to its machine."""
import os
import platform
import socket
import subprocess

from vllm_utils import threads


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
    """CPU model, cores and threads used, GPU and driver, versions, the host's name."""
    import torch

    packages = package_versions()
    env: dict[str, object] = {
        "torch": torch.__version__, "python": packages["python"], "host": socket.gethostname(),
        "machine": platform.machine(),
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
