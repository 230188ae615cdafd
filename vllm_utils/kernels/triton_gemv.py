"""A Triton matrix-vector product for one input row (decode at batch 1), where a step reads every weight
once and nothing else matters but how close that read comes to the memory's bandwidth.

Off by default (the engine config's `triton_gemv`, or VLLM_UTILS_TRITON_GEMV=1). `benchmarks/gpu_gemv.py` times
it against cuBLAS over block shapes on the decode products of LLaVA-1.5-7B; GEMV_CONFIG holds its choice."""
import torch
import triton
import triton.language as tl

# (BLOCK_N, BLOCK_K, num_warps, num_stages): not yet tuned on a GPU (see the module docstring)
GEMV_CONFIG = (16, 256, 4, 4)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One contiguous input row of the weight's dtype, and a contiguous weight."""
    return x.numel() == x.shape[-1] and weight.is_contiguous() and x.is_contiguous() and x.dtype == weight.dtype


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, N, K, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Program i: outputs [i*BLOCK_N, (i+1)*BLOCK_N), each weight row read start to end once. Products
    are summed in a [BLOCK_N, BLOCK_K] float32 tile and reduced across K once, at the end."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x: one row ([..., K] with a single row), weight [N, K] contiguous -> [..., N]."""
    n, k = weight.shape
    block_n, block_k, warps, stages = config or GEMV_CONFIG
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, bias if bias is not None else weight, out, n, k,
                                             HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
                                             num_warps=warps, num_stages=stages)
    return out
