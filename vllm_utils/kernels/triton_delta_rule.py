"""Triton gated delta rule for CUDA's decode steps: one token of each sequence updates its recurrent state in place
in the layer's pool (each state read and written once) and reads its output, with no host synchronisation. One
program per (sequence, value head, block of value columns); q and k are L2-normalised in the kernel, as the native
form (`layers/delta_rule.py`) does."""
import torch
import triton
import triton.language as tl

BLOCK_V = 32


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, states: torch.Tensor) -> bool:
    """A power-of-two key dim, heads dense within each token's row, a contiguous float32 pool."""
    key_dim = q.shape[-1]
    return (key_dim & (key_dim - 1) == 0 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and q.stride(1) == k.stride(1) == key_dim and v.stride(1) == v.shape[-1]
            and states.dtype == torch.float32 and states.is_contiguous())


@triton.jit
def _step_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, slots_ptr, out_ptr, q_stride, k_stride, v_stride,
                 value_heads, group, value_dim, scale, KEY_DIM: tl.constexpr, BLOCK_V: tl.constexpr):
    seq, head, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    key_head = head // group
    dk = tl.arange(0, KEY_DIM)
    q = tl.load(q_ptr + seq * q_stride + key_head * KEY_DIM + dk).to(tl.float32)
    k = tl.load(k_ptr + seq * k_stride + key_head * KEY_DIM + dk).to(tl.float32)
    q = q * (1.0 / tl.sqrt(tl.sum(q * q, axis=0) + 1e-6)) * scale
    k = k * (1.0 / tl.sqrt(tl.sum(k * k, axis=0) + 1e-6))
    cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < value_dim
    v = tl.load(v_ptr + seq * v_stride + head * value_dim + cols, mask=col_ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + seq * value_heads + head).to(tl.float32)
    beta = tl.load(beta_ptr + seq * value_heads + head).to(tl.float32)
    slot = tl.load(slots_ptr + seq).to(tl.int64)
    base = state_ptr + (slot * value_heads + head) * KEY_DIM * value_dim
    where = base + dk[:, None] * value_dim + cols[None, :]
    state = tl.load(where, mask=col_ok[None, :], other=0.0) * tl.exp(g)
    remembered = tl.sum(state * k[:, None], axis=0)
    delta = (v - remembered) * beta
    state = state + k[:, None] * delta[None, :]
    tl.store(where, state, mask=col_ok[None, :])
    out = tl.sum(state * q[:, None], axis=0)
    tl.store(out_ptr + (seq * value_heads + head) * value_dim + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


def recurrent_step_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                    states: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """As `GatedDeltaRule.forward_native` for a decode step (one token per sequence), the states of `slots`
    updated in place. Returns [seqs, value heads, value dim] in v's dtype."""
    seqs, key_heads, key_dim = q.shape
    value_heads, value_dim = v.shape[1:]
    out = torch.empty(seqs, value_heads, value_dim, dtype=v.dtype, device=v.device)
    grid = (seqs, value_heads, triton.cdiv(value_dim, BLOCK_V))
    _step_kernel[grid](q, k, v, g.contiguous(), beta.contiguous(), states, slots, out, q.stride(0), k.stride(0),
                       v.stride(0), value_heads, value_heads // key_heads, value_dim, key_dim**-0.5,
                       KEY_DIM=key_dim, BLOCK_V=BLOCK_V)
    return out
