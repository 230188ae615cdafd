"""What the model runner tells attention about a step."""
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [tokens] flat cache slot (block * block_size + offset) for each new token
    # prefill: the batch is the prompts (or chunks of them) packed one after another
    seq_lens: list[int] | None = None
    # prefill with chunks: tokens of each prompt already in the cache (its queries also attend to those,
    # read through `block_tables`); None when every prompt starts here
    cached_lens: list[int] | None = None
    # prefill where some positions see later ones (an image's positions, both ways): per query [tokens] int32, the
    # end (exclusive) of the keys it sees, as a position in its sequence; None: causal (each sees up to itself)
    key_ends: torch.Tensor | None = None
    # decode (and chunked prefill): one new token per sequence
    block_tables: torch.Tensor | None = None  # [seqs, max_blocks] int32, padded with 0
    context_lens: torch.Tensor | None = None  # [seqs] integer, tokens in cache including the new one
    # decode, for backends that ask for it (`reads_runs`): per sequence, the first block if its blocks are
    # one ascending run (so its cache is a plain slice of the pool), else -1
    run_starts: list[int] | None = None
    # models with a recurrent state (linear attention): each sequence's state slot [seqs], and the slots of the
    # prompts starting this step (their state starts from zeros)
    state_slots: torch.Tensor | None = None
    fresh_slots: torch.Tensor | None = None
