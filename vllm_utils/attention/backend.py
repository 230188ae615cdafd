"""The attention-backend interface: what the model runner tells attention about a batch, and the
two operations every backend provides (store new K/V in the paged cache; attend). The cache layout,
[blocks, block_size, kv_heads, head_dim] per layer, belongs to the engine, not to a backend."""
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AttentionMetadata:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [tokens] flat cache slot (block * block_size + offset) for each new token
    # prefill: the batch is the prompts packed one after another
    seq_lens: list[int] | None = None
    # decode: one new token per sequence
    block_tables: torch.Tensor | None = None  # [seqs, max_blocks] int32, padded with 0
    context_lens: torch.Tensor | None = None  # [seqs] integer, tokens in cache including the new one
    # decode, for backends that ask for it (`reads_runs`): per sequence, the first block if its blocks are
    # one ascending run (so its cache is a plain slice of the pool), else -1
    run_starts: list[int] | None = None


class AttentionBackend(Protocol):
    name: str
    reads_runs: bool  # wants AttentionMetadata.run_starts on this device

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None: ...

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [tokens, heads, dim], k/v: [tokens, kv_heads, dim], caches: [blocks, block_size, kv_heads, dim],
        already holding this step's k/v. Returns [tokens, heads, dim]."""
        ...


_BACKENDS: dict[str, type] = {}


def register_backend(name: str):
    def wrap(cls: type) -> type:
        _BACKENDS[name] = cls
        cls.name = name
        return cls

    return wrap


def get_backend(name: str, device: torch.device) -> AttentionBackend:
    """`name` "auto": Triton on CUDA when Triton is installed, else the PyTorch reference."""
    from vllm_utils.attention import torch_paged  # noqa: F401  (registers itself)

    if name in ("auto", "triton") and device.type == "cuda":
        try:
            from vllm_utils.attention import triton_paged  # noqa: F401
        except ImportError:
            if name == "triton":
                from vllm_utils.errors import UserError

                raise UserError("attention backend 'triton' needs the triton package; install it or use 'torch'") from None
    if name == "auto":
        name = "triton" if "triton" in _BACKENDS and device.type == "cuda" else "torch"
    if name not in _BACKENDS:
        from vllm_utils.errors import UserError

        raise UserError(f"attention backend '{name}' is not available on {device.type}; use 'torch'")
    return _BACKENDS[name](device)
