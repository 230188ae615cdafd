"""Paged attention in plain PyTorch: runs on every device and is the ground truth for faster backends."""
import torch
import torch.nn.functional as F

from vllm_utils.attention.metadata import AttentionMetadata
from vllm_utils.layers.rotary import RotaryEmbedding


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """cache[blocks] ([blocks, block_size, kv_heads, dim]) as one copy, each block copied whole as 8-byte words:
    PyTorch's gather copies a 4-D bf16 cache element by element, several times slower."""
    width = cache[0].numel() * cache.element_size()
    if not cache.is_contiguous() or width % 8:
        return cache.index_select(0, blocks)
    words = cache.view(cache.shape[0], -1).view(torch.int64)
    return words.index_select(0, blocks).view(cache.dtype).view(blocks.numel(), *cache.shape[1:])


class TorchPagedAttention:
    name = "torch"

    def __init__(self, reads_runs: bool = False) -> None:
        # reading each sequence's run of blocks in place beats gathering the whole batch's cache on CPUs
        self.reads_runs = reads_runs

    def rope_and_store(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       rotary: RotaryEmbedding | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if rotary is not None:
            q, k = rotary(positions, q, k)
        self.store_kv(k, v, k_cache, v_cache, slot_mapping)
        return q, k

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)

    def attend(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float,
               window: int | None = None) -> torch.Tensor:
        if meta.is_prefill and meta.cached_lens is not None:
            return self.prefill_after_cached(q, k, v, k_cache, v_cache, meta, scale, window)
        if meta.is_prefill:
            return self.prefill(q, k, v, meta.seq_lens, scale, window, meta.key_ends)
        if meta.run_starts is not None:
            return self.decode_runs(q, k_cache, v_cache, meta, scale, window)
        return self.decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, window)

    def prefill(self, q, k, v, seq_lens: list[int], scale: float, window: int | None = None,
                key_ends: torch.Tensor | None = None) -> torch.Tensor:
        # Each prompt attends to itself, causally but for `key_ends`; the new K/V are the whole context.
        if k.shape[1] != q.shape[1]:  # expand GQA heads: enable_gqa would push CUDA SDPA onto its slow path
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        start = 0
        for n in seq_lens:
            s = slice(start, start + n)
            # 4-D [1, heads, tokens, dim]: CUDA's flash kernels take no 3-D input
            positions = torch.arange(n, device=q.device)
            mask = None if key_ends is None and (window is None or window >= n) else \
                visible_keys(positions, n, window, None if key_ends is None else key_ends[s])
            out[s] = F.scaled_dot_product_attention(
                q[None, s].transpose(1, 2), k[None, s].transpose(1, 2), v[None, s].transpose(1, 2),
                attn_mask=mask, is_causal=mask is None, scale=scale,
            )[0].transpose(0, 1)
            start += n
        return out

    def prefill_after_cached(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                             window: int | None = None) -> torch.Tensor:
        """Chunks of prompts whose earlier tokens are in the cache: each chunk's queries attend to its sequence's
        whole cache so far (this step's K/V included), read block by block, causally but for `meta.key_ends`. A
        whole prompt in the same step (nothing cached) attends to this step's `k`, `v` as `prefill` does."""
        block_size = k_cache.shape[1]
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        row = 0
        for i, (n, cached) in enumerate(zip(meta.seq_lens, meta.cached_lens)):
            rows = slice(row, row + n)
            ends = None if meta.key_ends is None else meta.key_ends[rows]
            row += n
            if cached == 0:
                out[rows] = self.prefill(q[rows], k[rows], v[rows], [n], scale, window, ends)
                continue
            length = cached + n
            blocks = meta.block_tables[i, : -(-length // block_size)].long()
            keys, values = (gather_blocks(c, blocks).flatten(0, 1)[:length].transpose(0, 1)[None]
                            for c in (k_cache, v_cache))
            mask = visible_keys(torch.arange(cached, length, device=q.device), length, window, ends)
            out[rows] = F.scaled_dot_product_attention(q[rows].transpose(0, 1)[None], keys, values, attn_mask=mask,
                                                       scale=scale, enable_gqa=True)[0].transpose(0, 1)
        return out

    def decode_runs(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                    window: int | None = None) -> torch.Tensor:
        """One sequence at a time: a sequence whose blocks form one run attends to a slice of the pool
        (no copy); the others (e.g. after a shared cached prefix) gather the blocks they see into one run first."""
        block_size = k_cache.shape[1]
        flat_k, flat_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        for i, (start, length) in enumerate(zip(meta.run_starts, meta.context_lens.tolist())):
            first = length - min(length, window or length)  # the first position it sees
            if start < 0:
                skipped = first // block_size * block_size
                blocks = meta.block_tables[i, skipped // block_size : -(-length // block_size)].long()
                k, v = (gather_blocks(c, blocks).flatten(0, 1)[first - skipped : length - skipped]
                        for c in (k_cache, v_cache))
                out[i] = self.decode_one(q[i], k, v, scale)
                continue
            out[i] = self.decode_one(q[i], flat_k[start * block_size + first : start * block_size + length],
                                     flat_v[start * block_size + first : start * block_size + length], scale)
        return out

    @staticmethod
    def decode_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [heads, dim] over one sequence's contiguous cache k, v [tokens, kv_heads, dim], all visible."""
        k, v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        return F.scaled_dot_product_attention(q[None, :, None], k, v, scale=scale, enable_gqa=True)[0, :, 0]

    def decode(self, q, k_cache, v_cache, block_tables, context_lens, scale: float,
               window: int | None = None) -> torch.Tensor:
        seqs, max_blocks = block_tables.shape
        block_size = k_cache.shape[1]
        # Gather each sequence's blocks into a contiguous [seqs, ctx, kv_heads, dim] copy.
        ids = block_tables.flatten().long()
        k = gather_blocks(k_cache, ids).view(seqs, -1, *k_cache.shape[2:]).transpose(1, 2)
        v = gather_blocks(v_cache, ids).view(seqs, -1, *v_cache.shape[2:]).transpose(1, 2)
        positions = torch.arange(max_blocks * block_size, device=q.device)[None, :]
        mask = positions < context_lens[:, None]
        if window is not None:
            mask &= positions >= context_lens[:, None] - window
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale,
                                             enable_gqa=True)
        return out.squeeze(2)


def visible_keys(positions: torch.Tensor, keys: int, window: int | None,
                 key_ends: torch.Tensor | None = None) -> torch.Tensor:
    """[queries, keys] bool for queries at `positions` of their sequence over its first `keys` positions: each
    sees the keys before its key end (default: itself included, causal) and, with `window`, none `window` or more
    positions before it."""
    key = torch.arange(keys, device=positions.device)
    ends = positions + 1 if key_ends is None else key_ends
    mask = key < ends[:, None]
    if window is not None:
        mask &= key > (positions - window)[:, None]
    return mask
