"""Triton kernels that fuse what every decoder layer repeats (add + RMSNorm, SiLU * up, RoPE), so a
decode step launches a handful of kernels per layer. Each keeps transformers' rounding points, so
results equal the unfused PyTorch code. Used on CUDA tensors when Triton is installed."""
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_r, stride_o, n, eps,
                            HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
            x = x.to(out_ptr.dtype.element_ty)
            tl.store(residual_ptr + row * stride_r + offs, x, mask=mask)  # the new residual, in place
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
        normed = (xf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + n + offs, mask=mask, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(x_ptr, positions_ptr, cos_ptr, sin_ptr, stride_t, stride_cache,
                     HALF: tl.constexpr, HEAD_DIM: tl.constexpr):
        token = tl.program_id(0)
        head = tl.program_id(1)
        pos = tl.load(positions_ptr + token)
        offs = tl.arange(0, HALF)
        base = x_ptr + token * stride_t + head * HEAD_DIM
        x1 = tl.load(base + offs)
        x2 = tl.load(base + HALF + offs)
        dtype = x1.dtype
        cos = tl.load(cos_ptr + pos * stride_cache + offs).to(dtype).to(tl.float32)
        sin = tl.load(sin_ptr + pos * stride_cache + offs).to(dtype).to(tl.float32)
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        # q*cos + rotate_half(q)*sin, rounded where PyTorch rounds
        out1 = (x1f * cos).to(dtype).to(tl.float32) + (-x2f * sin).to(dtype).to(tl.float32)
        out2 = (x2f * cos).to(dtype).to(tl.float32) + (x1f * sin).to(dtype).to(tl.float32)
        tl.store(base + offs, out1.to(dtype))
        tl.store(base + HALF + offs, out2.to(dtype))


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None) -> torch.Tensor:
    """RMSNorm(x + residual); the sum is written back into `residual`."""
    n = x.shape[-1]
    out = torch.empty_like(x)
    r = residual if residual is not None else x
    _add_rmsnorm_kernel[(x.shape[0],)](x, r, weight, out, x.stride(0), r.stride(0), out.stride(0), n, eps,
                                       HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n))
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1] // 2
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_mul_kernel[(x.shape[0], triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), n, BLOCK=block)
    return out


def rope_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place on x: [tokens, heads, head_dim] (a view whose heads are contiguous)."""
    tokens, heads, dim = x.shape
    _rope_kernel[(tokens, heads)](x, positions, cos, sin, x.stride(0), cos.stride(0), HALF=dim // 2, HEAD_DIM=dim)
