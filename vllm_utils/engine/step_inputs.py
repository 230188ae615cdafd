"""What one step hands the model runner's `execute` (and the other tensor-parallel ranks): host tensors, by name."""
from dataclasses import dataclass, field

import torch

from vllm_utils.multimodal.inputs import MultiModalInputs


@dataclass
class PrefillInputs:
    """The prompts (or chunks of prompts) of a step, packed one after another."""

    token_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    slots: torch.Tensor  # [tokens] the cache slot each token's K/V goes to
    seq_lens: list[int]  # tokens of each sequence in this step
    mm_mask: torch.Tensor  # [tokens] bool: the positions that take multimodal embeddings
    mm_inputs: MultiModalInputs  # the items of the sequences that start this step, in order ({} for none)
    seq_ids: list[int]
    cached_lens: list[int]  # tokens of each sequence already in the cache (chunked prefill)
    samples: list[bool]  # whether each sequence's last token here gets the next token's logits
    mm_offsets: list[int]  # multimodal positions of each sequence before this step's tokens
    mm_new: list[tuple[int, int]]  # (sequence id, all its multimodal positions) of those whose items come now
    block_tables: torch.Tensor | None = None  # [seqs, width] int32, when any sequence has cached tokens
    all_rows: list[bool] = field(default_factory=list)  # per sequence: logits of every row wanted (prompt_logprobs)


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
