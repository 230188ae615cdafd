"""The environment switches, read in one place: the engine's are defaults of EngineConfig fields, so code and tests
set the field, never the environment."""
import os

CPU_KERNELS = "VLLM_UTILS_CPU_KERNELS"  # "0": our C kernels off on CPUs (for A/B runs)
CPU_FOLLOW_LOAD = "VLLM_UTILS_CPU_FOLLOW_LOAD"  # "0": the CPU thread team keeps its size beside busy processes
TRITON_GEMV = "VLLM_UTILS_TRITON_GEMV"  # "1": single-row linears on CUDA through our Triton GEMV
PROGRESS_INTERVAL = "VLLM_UTILS_PROGRESS_INTERVAL"  # seconds between progress lines when stderr is no terminal


def cpu_kernels() -> bool:
    return os.environ.get(CPU_KERNELS, "1") != "0"


def cpu_follow_load() -> bool:
    return os.environ.get(CPU_FOLLOW_LOAD, "1") != "0"


def triton_gemv() -> bool:
    return os.environ.get(TRITON_GEMV, "0") == "1"


def progress_interval() -> float:
    try:
        return max(0.0, float(os.environ.get(PROGRESS_INTERVAL, "10")))
    except ValueError:
        return 10.0
