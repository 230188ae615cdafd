"""The decode step's matrix-vector products of LLaVA-1.5-7B at batch 1 (bf16): cuBLAS (F.linear) against
our Triton GEMV over a grid of block shapes, as read bandwidth (weight bytes / time) next to the device's
copy bandwidth measured in the same run. Prints a table and the config that minimises a whole step.

    PYTHONPATH=. python3 benchmarks/gpu_gemv.py
"""
import itertools

import torch
import torch.nn.functional as F

from vllm_utils.kernels import triton_gemv

# (name, N, K, times per decode step): 32 layers of Llama-7B, then the LM head
SHAPES = [("qkv_proj", 12288, 4096, 32), ("o_proj", 4096, 4096, 32), ("gate_up_proj", 22016, 4096, 32),
          ("down_proj", 4096, 11008, 32), ("lm_head", 32000, 4096, 1)]
CONFIGS = list(itertools.product((8, 16, 32, 64), (128, 256, 512), (4, 8), (2, 4)))
L2_BYTES = 256 << 20  # rotate weight copies over more than any L2, so every read comes from HBM


def copy_bandwidth() -> float:
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / (time_ms(lambda i: b.copy_(a), 10) / 1e3)


def time_ms(fn, reps: int = 50) -> float:
    for i in range(3):
        fn(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(reps):
        fn(i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    bandwidth = copy_bandwidth()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bandwidth / 1e12:.2f} TB/s\n")
    cublas: dict[str, float] = {}
    triton_ms: dict[tuple[str, tuple], float] = {}
    for name, n, k, _ in SHAPES:
        copies = max(1, -(-L2_BYTES // (n * k * 2)))
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        cublas[name] = time_ms(lambda i: F.linear(x, weights[i % copies]))
        expected = F.linear(x, weights[0]).float()
        for config in CONFIGS:
            try:
                got = triton_gemv.gemv(x, weights[0], None, config).float()
            except Exception as error:  # e.g. more shared memory than the device has: that shape is out
                print(f"{name} {config}: skipped ({type(error).__name__})")
                triton_ms[name, config] = float("inf")
                continue
            assert ((got - expected).norm() / expected.norm()).item() < 1e-2, (name, config)
            triton_ms[name, config] = time_ms(lambda i: triton_gemv.gemv(x, weights[i % copies], None, config))
        del weights
    print("| product | N × K | cuBLAS µs (TB/s) | best Triton µs (TB/s) | its config (BLOCK_N, BLOCK_K, warps, stages) |")
    print("|---|---|---|---|---|")
    for name, n, k, _ in SHAPES:
        best = min(CONFIGS, key=lambda c: triton_ms[name, c])
        tb = lambda ms: n * k * 2 / (ms / 1e3) / 1e12  # noqa: E731
        print(f"| {name} | {n} × {k} | {cublas[name] * 1e3:.1f} ({tb(cublas[name]):.2f}) | "
              f"{triton_ms[name, best] * 1e3:.1f} ({tb(triton_ms[name, best]):.2f}) | {best} |")
    step = lambda ms_of: sum(count * ms_of(name) for name, _, _, count in SHAPES)  # noqa: E731
    one_config = min(CONFIGS, key=lambda c: step(lambda name: triton_ms[name, c]))
    floor = sum(count * n * k * 2 for _, n, k, count in SHAPES) / bandwidth * 1e3
    print(f"\nproducts of one decode step: cuBLAS {step(cublas.get):.2f} ms; Triton, best config per product "
          f"{step(lambda name: min(triton_ms[name, c] for c in CONFIGS)):.2f} ms; Triton, one config for all "
          f"{one_config}: {step(lambda name: triton_ms[name, one_config]):.2f} ms; floor (bytes / copy bandwidth) "
          f"{floor:.2f} ms")


if __name__ == "__main__":
    main()
