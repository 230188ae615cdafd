"""The physical limits the benchmarks compare our CPU figures against, measured on this machine: the memory read
bandwidth (streamed the way our linear kernel reads weights) and the bf16 dot-product peak (probes.c)."""
import ctypes
import functools
import time
from pathlib import Path

import torch

from vllm_utils.kernels import cpu
from vllm_utils.platforms.cpu import advise_huge_pages

SOURCE = Path(__file__).with_name("probes.c")


@functools.cache
def _library() -> ctypes.CDLL:
    reason = cpu.unavailable_reason()
    if reason:
        raise RuntimeError(f"the probes need our CPU kernels' toolchain and CPU: {reason}")
    lib = ctypes.CDLL(str(cpu.build_library(SOURCE, cpu.compiler())))
    lib.probe_stream_read.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    lib.probe_stream_read.restype = ctypes.c_long
    lib.probe_dpbf16_flops.argtypes = [ctypes.c_long]
    lib.probe_dpbf16_flops.restype = ctypes.c_double
    return lib


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of the fastest of `repeats` streaming reads of a buffer on 2 MB pages, read as the linear kernel
    reads weights: the memory-bandwidth floor of decode."""
    lib = _library()
    buf = torch.empty(nbytes + (2 << 20), dtype=torch.uint8)
    aligned = buf[(-buf.data_ptr()) % (2 << 20):][: nbytes // 256 * 256]
    advise_huge_pages([aligned])
    aligned.fill_(1)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        lib.probe_stream_read(aligned.data_ptr(), aligned.numel(), cpu.prefetch_distance())
        best = min(best, time.perf_counter() - start)
    return aligned.numel() / best


def peak_bf16_flops(iters: int = 20_000_000, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` runs of independent 512-bit bf16 dot products on every thread: the
    compute ceiling of prefill (no matmul reaches it: loads and stores cost too)."""
    lib = _library()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        flops = lib.probe_dpbf16_flops(iters // torch.get_num_threads())
        best = max(best, flops / (time.perf_counter() - start))
    return best
