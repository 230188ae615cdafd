"""What one step hands the model runner's `execute` (and the other tensor-parallel ranks): host tensors, by name."""
from dataclasses import dataclass, field

import torch

from vllm_utils.multimodal.inputs import MultiModalInputs


@dataclass
class PrefillInputs:
    """The prompts of a step, packed one after another."""

    token_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    slots: torch.Tensor  # [tokens] the cache slot each token's K/V goes to
    seq_lens: list[int]
    mm_mask: torch.Tensor  # [tokens] bool: the positions that take multimodal embeddings
    mm_inputs: MultiModalInputs  # every item of the step, in prompt order ({} for none)
    all_rows: list[bool] = field(default_factory=list)  # per prompt: logits of every row wanted, not only the last


@dataclass
class DecodeInputs:
    """One new token per sequence."""

    token_ids: torch.Tensor  # [seqs] each sequence's last token
    positions: torch.Tensor  # [seqs]
    slots: torch.Tensor  # [seqs]
    context_lens: torch.Tensor  # [seqs] tokens in the cache, the new one included
    block_tables: torch.Tensor  # [seqs, width] int32, padded with 0
    run_starts: list[int] | None = None  # see AttentionMetadata.run_starts


StepInputs = PrefillInputs | DecodeInputs
