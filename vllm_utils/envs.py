"""The environment switches, read in one place: each is the default of an EngineConfig field, so code and tests set
the field, never the environment."""
import os

CPU_KERNELS = "VLLM_UTILS_CPU_KERNELS"  # "0": our C kernels off on CPUs (for A/B runs)
TRITON_GEMV = "VLLM_UTILS_TRITON_GEMV"  # "1": single-row linears on CUDA through our Triton GEMV


def cpu_kernels() -> bool:
    return os.environ.get(CPU_KERNELS, "1") != "0"


def triton_gemv() -> bool:
    return os.environ.get(TRITON_GEMV, "0") == "1"
