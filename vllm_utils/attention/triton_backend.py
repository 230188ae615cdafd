"""Paged attention for CUDA: K/V stores (fused with RoPE) and decode in Triton; prefill as the PyTorch backend
(SDPA)."""
import torch

from vllm_utils.attention.torch_backend import TorchPagedAttention
from vllm_utils.kernels import triton_attention, triton_fused
from vllm_utils.layers.rotary import RotaryEmbedding


class TritonPagedAttention(TorchPagedAttention):
    name = "triton"

    def __init__(self) -> None:
        super().__init__(reads_runs=False)  # decode reads the block tables itself

    def rope_and_store(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       rotary: RotaryEmbedding | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE of q and k and the store of k and v in one launch (in place)."""
        if rotary is None:
            return super().rope_and_store(positions, q, k, v, rotary, k_cache, v_cache, slot_mapping)
        index, cos, sin = rotary.tables(positions)
        triton_fused.rope_and_store_(q, k, v, index, cos, sin, k_cache, v_cache, slot_mapping)
        return q, k

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        triton_attention.store_kv(k, v, k_cache, v_cache, slot_mapping)

    def decode(self, q, k_cache, v_cache, block_tables, context_lens, scale: float,
               window: int | None = None) -> torch.Tensor:
        return triton_attention.paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, window)
