"""The attention-backend interface: the operations every backend provides on the paged cache. The cache layout,
[blocks, block_size, kv_heads, head_dim] per layer, belongs to the engine, not to a backend."""
from typing import Protocol

import torch

from vllm_utils.attention.metadata import AttentionMetadata
from vllm_utils.layers.rotary import RotaryEmbedding


class AttentionBackend(Protocol):
    name: str
    reads_runs: bool  # wants AttentionMetadata.run_starts

    def rope_and_store(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       rotary: RotaryEmbedding | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Applies `rotary` (if any) to q and k, and writes k and v into their cache slots. Returns q, k."""
        ...

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, window: int | None) -> torch.Tensor:
        """q: [tokens, heads, dim], k/v: [tokens, kv_heads, dim], caches: [blocks, block_size, kv_heads, dim],
        already holding this step's k/v; causal, and with `window` each query sees only the keys of the last
        `window` positions (itself included). Returns [tokens, heads, dim]."""
        ...
