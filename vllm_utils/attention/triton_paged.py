"""Paged attention for CUDA in Triton: one kernel stores new K/V into their cache slots, one computes
decode attention reading only each sequence's own blocks (online softmax). Prefill uses SDPA."""
import torch
import triton
import triton.language as tl

from vllm_utils.attention.backend import AttentionMetadata, register_backend
from vllm_utils.attention.torch_paged import TorchPagedAttention


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v,
                     ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs = tl.arange(0, ROW_PAD)
    mask = (offs < ROW) & (slot >= 0)
    tl.store(k_cache_ptr + slot * ROW + offs, tl.load(k_ptr + token * stride_k + offs, mask=mask), mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, tl.load(v_ptr + token * stride_v + offs, mask=mask), mask=mask)


@triton.jit
def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, scale,
                         stride_q, stride_block, stride_table, stride_out,
                         NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + seq * stride_q + heads[:, None] * HEAD_DIM + offs_d[None, :],
                mask=(offs_g < GROUP)[:, None], other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in range(0, context_len, TILE):
        offs_t = start + tl.arange(0, TILE)
        valid = offs_t < context_len
        block = tl.load(block_tables_ptr + seq * stride_table + offs_t // BLOCK_SIZE, mask=valid, other=0)
        row = block.to(tl.int64) * stride_block + (offs_t % BLOCK_SIZE) * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM
        k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        denom = denom * alpha + tl.sum(p, axis=1)
        m = m_new
    out = acc / denom[:, None]
    tl.store(out_ptr + seq * stride_out + heads[:, None] * HEAD_DIM + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(offs_g < GROUP)[:, None])


@register_backend("triton")
class TritonPagedAttention:
    def store_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        row = k.shape[1] * k.shape[2]
        _store_kv_kernel[(k.shape[0],)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                        ROW=row, ROW_PAD=triton.next_power_of_2(row))

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        self.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_prefill:
            return TorchPagedAttention._prefill(q, k, v, meta.seq_lens, scale)
        return self.decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)

    @staticmethod
    def decode(q, k_cache, v_cache, block_tables, context_lens, scale: float) -> torch.Tensor:
        seqs, heads, head_dim = q.shape
        kv_heads = k_cache.shape[2]
        group = heads // kv_heads
        assert q.stride(2) == 1 and q.stride(1) == head_dim, "heads of a token must be contiguous"
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        _paged_decode_kernel[(seqs, kv_heads)](
            q, k_cache, v_cache, block_tables, context_lens, out, scale,
            q.stride(0), k_cache.stride(0), block_tables.stride(0), out.stride(0),
            NUM_KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
            BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, TILE=64,
        )
        return out
