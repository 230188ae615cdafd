"""Triton kernels that fuse what every decoder layer repeats (add + RMSNorm, SiLU * up, RoPE + the K/V
store), so a decode step launches a handful of kernels per layer. Each keeps transformers' rounding points, so
results equal the unfused PyTorch code."""
import torch
import triton
import triton.language as tl


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
def _rotate_head(base, cos_row, sin_row, HALF: tl.constexpr):
    """x*cos + rotate_half(x)*sin for one head, in place, rounded where PyTorch rounds; returns both halves."""
    offs = tl.arange(0, HALF)
    x1 = tl.load(base + offs)
    x2 = tl.load(base + HALF + offs)
    dtype = x1.dtype
    cos = tl.load(cos_row + offs).to(dtype).to(tl.float32)
    sin = tl.load(sin_row + offs).to(dtype).to(tl.float32)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    out1 = ((x1f * cos).to(dtype).to(tl.float32) + (-x2f * sin).to(dtype).to(tl.float32)).to(dtype)
    out2 = ((x2f * cos).to(dtype).to(tl.float32) + (x1f * sin).to(dtype).to(tl.float32)).to(dtype)
    tl.store(base + offs, out1)
    tl.store(base + HALF + offs, out2)
    return out1, out2

@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, positions_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                       stride_q, stride_k, stride_v, stride_cos, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                       HEAD_DIM: tl.constexpr):
    """Program (token, h): h < HEADS rotates that query head; the others rotate a key head and write it,
    with its value head, into the token's cache slot."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    pos = tl.load(positions_ptr + token)
    cos_row, sin_row = cos_ptr + pos * stride_cos, sin_ptr + pos * stride_cos
    if head < HEADS:
        _rotate_head(q_ptr + token * stride_q + head * HEAD_DIM, cos_row, sin_row, HEAD_DIM // 2)
    else:
        kv_head = head - HEADS
        k1, k2 = _rotate_head(k_ptr + token * stride_k + kv_head * HEAD_DIM, cos_row, sin_row, HEAD_DIM // 2)
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:
            dst = slot * (KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM
            half = tl.arange(0, HEAD_DIM // 2)
            tl.store(k_cache_ptr + dst + half, k1)
            tl.store(k_cache_ptr + dst + HEAD_DIM // 2 + half, k2)
            offs = tl.arange(0, HEAD_DIM)
            tl.store(v_cache_ptr + dst + offs, tl.load(v_ptr + token * stride_v + kv_head * HEAD_DIM + offs))


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


def rope_and_store_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """RoPE on q and k in place ([tokens, heads, head_dim] views whose heads are contiguous), and the rotated
    k and v written to their slots of the paged caches ([blocks, block_size, kv_heads, head_dim]): what
    would be three launches per layer, in one."""
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[2:] == (kv_heads, dim)
    _rope_store_kernel[(tokens, heads + kv_heads)](
        q, k, v, positions, cos, sin, k_cache, v_cache, slots, q.stride(0), k.stride(0), v.stride(0), cos.stride(0),
        HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=dim)
