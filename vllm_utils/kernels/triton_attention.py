"""Paged attention kernels in Triton: one stores new K/V into their cache slots, one computes decode attention
reading only each sequence's own blocks (online softmax, split over the context: flash-decoding)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v,
                     ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs = tl.arange(0, ROW_PAD)
    mask = offs < ROW
    if slot >= 0:
        tl.store(k_cache_ptr + slot * ROW + offs, tl.load(k_ptr + token * stride_k + offs, mask=mask), mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offs, tl.load(v_ptr + token * stride_v + offs, mask=mask), mask=mask)


@triton.jit
def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, part_out_ptr,
                         part_stats_ptr, out_ptr, scale, window, split_tokens, num_splits, stride_q, stride_block,
                         stride_table, stride_out, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                         GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                         TILE: tl.constexpr, ONE_SPLIT: tl.constexpr):
    """One (sequence, kv head, context split): unnormalised attention over that split's tokens (those of the
    last `window` positions only, when window > 0), or with ONE_SPLIT (the whole context in one program) the
    normalised output itself."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    begin = split * split_tokens
    end = tl.minimum(begin + split_tokens, context_len)
    if window > 0:
        begin = tl.maximum(begin, context_len - window)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + offs_g
    in_group = offs_g < GROUP
    q = tl.load(q_ptr + seq * stride_q + heads[:, None] * HEAD_DIM + offs_d[None, :], mask=in_group[:, None], other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in range(begin, end, TILE):
        offs_t = start + tl.arange(0, TILE)
        valid = offs_t < end
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
    if ONE_SPLIT:
        tl.store(out_ptr + seq * stride_out + heads[:, None] * HEAD_DIM + offs_d[None, :],
                 (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=in_group[:, None])
    else:  # partials laid out [seq, head, split, ...]
        index = (seq * NUM_KV_HEADS * GROUP + heads) * num_splits + split
        tl.store(part_out_ptr + index[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=in_group[:, None])
        tl.store(part_stats_ptr + index * 2, m, mask=in_group)
        tl.store(part_stats_ptr + index * 2 + 1, denom, mask=in_group)


@triton.jit
def _combine_splits_kernel(part_out_ptr, part_stats_ptr, out_ptr, num_splits, stride_out,
                           HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    used = offs_s < num_splits
    index = (seq * HEADS + head) * num_splits + offs_s
    m = tl.load(part_stats_ptr + index * 2, mask=used, other=float("-inf"))
    denom = tl.load(part_stats_ptr + index * 2 + 1, mask=used, other=0.0)
    m_max = tl.max(m, axis=0)  # finite: the split holding the newest token always has one
    weight = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
    acc = tl.load(part_out_ptr + index[:, None] * HEAD_DIM + offs_d[None, :], mask=used[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(denom * weight, axis=0)
    tl.store(out_ptr + seq * stride_out + head * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty))


TILE = 64
TARGET_PROGRAMS = 1024  # enough (sequence, head, split) programs to keep every SM streaming the cache


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [tokens, kv_heads, dim] into their slots of the caches [blocks, block_size, kv_heads, dim]; a slot
    of -1 writes nothing."""
    row = k.shape[1] * k.shape[2]
    _store_kv_kernel[(k.shape[0],)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                    ROW=row, ROW_PAD=triton.next_power_of_2(row))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, window: int | None = None) -> torch.Tensor:
    """One query token per sequence (q [seqs, heads, dim]) over its blocks (the last `window` positions only,
    when given). The context is split so that small batches still use the whole GPU; the split count depends only
    on shapes, so a captured graph stays valid for any context length."""
    seqs, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    assert q.stride(2) == 1 and q.stride(1) == head_dim, "heads of a token must be contiguous"
    max_context = block_tables.shape[1] * k_cache.shape[1]
    splits = max(1, min(TARGET_PROGRAMS // (seqs * kv_heads), triton.cdiv(max_context, 2 * TILE)))
    split_tokens = triton.cdiv(triton.cdiv(max_context, splits), TILE) * TILE
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # with one split (large batches) the kernel writes `out` itself: no partials, no combine
    part_out, part_stats = out, out
    if splits > 1:
        part_out = torch.empty(seqs, heads, splits, head_dim, dtype=torch.float32, device=q.device)
        part_stats = torch.empty(seqs, heads, splits, 2, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(seqs, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, part_out, part_stats, out, scale, window or 0, split_tokens,
        splits, q.stride(0), k_cache.stride(0), block_tables.stride(0), out.stride(0),
        NUM_KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, TILE=TILE, ONE_SPLIT=splits == 1,
    )
    if splits == 1:
        return out
    _combine_splits_kernel[(seqs, heads)](part_out, part_stats, out, splits, out.stride(0), HEADS=heads,
                                          HEAD_DIM=head_dim, SPLITS_PAD=max(2, triton.next_power_of_2(splits)))
    return out
