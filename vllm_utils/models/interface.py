"""The interface between the engine and a model family: what the model runner calls, and nothing else. A model
is an nn.Module built from the HF config (`cls(hf_config)`) on the target device and dtype."""
from typing import ClassVar, Protocol

import torch
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.attention.metadata import AttentionMetadata
from vllm_utils.multimodal.inputs import MultiModalInputs


class VisionLanguageModel(Protocol):
    # checkpoint projection name -> (our fused parameter, shard id), for the loader
    packed_modules: ClassVar[dict[str, tuple[str, object]]]
    # the token ids that mark multimodal positions in a prompt (one per position an item yields)
    mm_token_ids: tuple[int, ...]
    # 1: a token's position is its index; 3: multimodal RoPE, a prompt's positions come from `rope_positions`
    position_rows: ClassVar[int]
    # True: the positions of each run of consecutive placeholders (one image) attend to each other both ways, the
    # rest causally (the engine's default when a model does not set it: False, causal everywhere)
    bidirectional_mm: ClassVar[bool]

    def __init__(self, config: PretrainedConfig) -> None: ...

    @staticmethod
    def check_config(config: PretrainedConfig) -> None:
        """Refuses (UserError), by name, every configuration value the model does not implement: called before
        anything is loaded."""

    @classmethod
    def tensor_parallel_widths(cls, config: PretrainedConfig) -> dict[str, int]:
        """What --tensor-parallel-size must divide, by name (the heads and MLP widths the ranks split)."""

    def checkpoint_key(self, key: str) -> str | None:
        """Our parameter name for a checkpoint tensor's name (any key layout the family has on the hub), or
        None for tensors we never use."""

    def prompt_only_modules(self) -> list[tuple[nn.Module, int]]:
        """Modules that never run in a decode step (vision tower, projector), each with the typical row count
        of its products: a platform may lay their weights out for prompt-sized products."""

    def encode_mm(self, mm_inputs: MultiModalInputs) -> torch.Tensor:
        """Embeddings of every multimodal position of the batch, in prompt order: [positions, hidden]."""

    def rope_positions(self, is_mm: list[bool], mm_inputs: MultiModalInputs | None,
                       token_ids: list[int] | None = None) -> tuple[torch.Tensor, int]:
        """Only with position_rows 3: a prompt's positions [3, tokens] and the offset of the tokens after it
        (their position is their index plus it, in all rows). `is_mm` marks the prompt's multimodal positions;
        `token_ids` are the prompt's tokens (MiniCPM-V 4.7 reads the markers around its items there)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                mm_embeds: torch.Tensor | None = None, mm_mask: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states of every token (or of the rows `keep`). `positions` [position_rows, tokens] in a
        prefill of a model with several rows, else [tokens]. `mm_mask` [tokens] marks the positions
        that take the rows of `mm_embeds` in order, in place of their token embedding."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def static_mm_item(self) -> MultiModalInputs | None:
        """One item's inputs (zeros) when every item has these shapes and is one row of each tensor, so that
        the encoder can run as graphs captured per item count; None when items vary in shape."""
