"""The attention layer of a decoder: holds its slice of the paged KV cache, and has the backend apply RoPE, store
the new K/V and attend."""
import torch
from torch import nn

from vllm_utils.attention.backend import AttentionBackend
from vllm_utils.attention.metadata import AttentionMetadata
from vllm_utils.layers.rotary import RotaryEmbedding


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 rotary: RotaryEmbedding | None = None, sliding_window: int | None = None) -> None:
        """`sliding_window`: each query sees only the keys of the last this-many positions, itself included."""
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.rotary = rotary
        self.sliding_window = sliding_window
        self.backend: AttentionBackend | None = None  # set by the model runner with the caches
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.backend.rope_and_store(positions, q, k, v, self.rotary, self.k_cache, self.v_cache,
                                           meta.slot_mapping)
        out = self.backend.attend(q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window)
        return out.reshape(-1, self.num_heads * self.head_dim)
