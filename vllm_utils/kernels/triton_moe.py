"""Triton Mixture-of-Experts for CUDA: each (token, chosen expert) pair multiplies its row by that expert's
weights alone, with no host synchronisation (so decode steps capture as CUDA graphs). Two kernels: gate/up with
SiLU·up into a [pairs, inter] buffer, then down scaled by the routing weight into [pairs, hidden]; the top-k
pairs of a token are summed in PyTorch. A weight is read once per pair that chose it: the form for decode and
small batches (a grouped GEMM over tokens sorted by expert would read it once per step); not yet tuned on a GPU."""
import torch
import triton
import triton.language as tl

BLOCK_N, BLOCK_K = 32, 64
MAX_PAIRS = 256  # beyond this many (token, expert) pairs the native form's one product per expert reads less


def supports(x: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, act: str) -> bool:
    """SiLU experts, contiguous 2-D rows and weights of one dtype, at most MAX_PAIRS pairs."""
    return (act == "silu" and x.dim() == 2 and ids.numel() <= MAX_PAIRS and x.is_contiguous()
            and w13.is_contiguous() and w2.is_contiguous() and x.dtype == w13.dtype == w2.dtype)


@triton.jit
def _gate_up_kernel(x_ptr, ids_ptr, w13_ptr, h_ptr, TOP_K, H, I, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (pair, block): h[pair, block] = silu(gate) * up of the pair's token under the pair's expert."""
    pair = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < I
    token = pair // TOP_K
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    base = w13_ptr + expert * 2 * I * H
    gate = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for start in range(0, H, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < H
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + token.to(tl.int64) * H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        gate += tl.load(base + rows[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32) * x
        up += tl.load(base + (rows[:, None] + I) * H + cols[None, :], mask=mask, other=0.0).to(tl.float32) * x
    g = tl.sum(gate, axis=1)
    u = tl.sum(up, axis=1)
    # rounded to the input's dtype between the products, as the native form's separate ops round
    g = g.to(h_ptr.dtype.element_ty).to(tl.float32)
    u = u.to(h_ptr.dtype.element_ty).to(tl.float32)
    h = (g / (1.0 + tl.exp(-g))).to(h_ptr.dtype.element_ty).to(tl.float32) * u
    tl.store(h_ptr + pair.to(tl.int64) * I + rows, h.to(h_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _down_kernel(h_ptr, ids_ptr, weights_ptr, w2_ptr, out_ptr, H, I, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (pair, block): out[pair, block] = routing weight * (down of the pair's expert) · h[pair]."""
    pair = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < H
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    base = w2_ptr + expert * H * I
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for start in range(0, I, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < I
        h = tl.load(h_ptr + pair.to(tl.int64) * I + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc += tl.load(base + rows[:, None] * I + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                       other=0.0).to(tl.float32) * h
    down = tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weights_ptr + pair).to(tl.float32)
    tl.store(out_ptr + pair.to(tl.int64) * H + rows, (down * weight).to(out_ptr.dtype.element_ty), mask=row_ok)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    """x [tokens, hidden], w13 [experts, 2 * inter, hidden], w2 [experts, hidden, inter], weights and ids
    [tokens, top_k] -> [tokens, hidden]: FusedMoE.forward_native's result (this rank's part)."""
    tokens, hidden = x.shape
    top_k, inter = ids.shape[1], w2.shape[2]
    pairs = tokens * top_k
    ids = ids.contiguous()
    weights = weights.to(x.dtype).contiguous()
    h = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)
    if pairs:
        _gate_up_kernel[(pairs, triton.cdiv(inter, BLOCK_N))](x, ids, w13, h, top_k, hidden, inter,
                                                              BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        _down_kernel[(pairs, triton.cdiv(hidden, BLOCK_N))](h, ids, weights, w2, out, hidden, inter,
                                                            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out.view(tokens, top_k, hidden).sum(dim=1)
