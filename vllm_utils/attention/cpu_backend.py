"""Paged attention with our bf16 CPU kernels: a prompt's attention flash-style, and one token's attention over a
sequence's run of blocks read in place. Inputs the kernels do not take go the PyTorch way."""
import itertools

import torch

from vllm_utils.attention.torch_backend import TorchPagedAttention
from vllm_utils.kernels import cpu


class CpuPagedAttention(TorchPagedAttention):
    name = "cpu"

    def __init__(self) -> None:
        super().__init__(reads_runs=True)

    def prefill(self, q, k, v, seq_lens: list[int], scale: float, window: int | None = None,
                key_ends: torch.Tensor | None = None) -> torch.Tensor:
        if not cpu.supports_prefill_attention(q, k, v):
            return super().prefill(q, k, v, seq_lens, scale, window, key_ends)
        starts = itertools.accumulate(seq_lens[:-1], initial=0)
        return torch.cat([cpu.prefill_attention(q[s : s + n], k[s : s + n], v[s : s + n], scale, True, window,
                                                None if key_ends is None else key_ends[s : s + n])
                          for s, n in zip(starts, seq_lens)])

    @staticmethod
    def decode_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if cpu.supports_attention(q, k, v):
            return cpu.decode_attention(q, k, v, scale)
        return TorchPagedAttention.decode_one(q, k, v, scale)
