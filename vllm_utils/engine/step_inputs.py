"""What one step hands the model runner's `execute` (and the other tensor-parallel ranks): host tensors, by name,
built from the scheduled sequences (their tokens, positions, cache slots, multimodal items)."""
from collections.abc import Container
from dataclasses import dataclass, field

import torch

from vllm_utils.engine.scheduler import ScheduledStep
from vllm_utils.engine.sequence import Sequence
from vllm_utils.models.interface import VisionLanguageModel
from vllm_utils.multimodal.inputs import MultiModalInputs, concat_mm_inputs


@dataclass
class NewItems:
    """A sequence whose multimodal embeddings come this step (all its items, for this and its later chunks)."""

    seq_id: int
    rows: int  # all its multimodal positions
    key: bytes | None  # its items' content hash, the encoder cache's key (None: no encoder cache)
    encode: bool  # its items are in this step's mm_inputs; else the encoder cache holds their embeddings


@dataclass
class PrefillInputs:
    """The prompts (or chunks of prompts) of a step, packed one after another."""

    token_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    slots: torch.Tensor  # [tokens] the cache slot each token's K/V goes to
    seq_lens: list[int]  # tokens of each sequence in this step
    mm_mask: torch.Tensor  # [tokens] bool: the positions that take multimodal embeddings
    mm_inputs: MultiModalInputs  # the items to encode this step, in order ({} for none)
    seq_ids: list[int]
    cached_lens: list[int]  # tokens of each sequence already in the cache (chunked prefill)
    samples: list[bool]  # whether each sequence's last token here gets the next token's logits
    mm_offsets: list[int]  # multimodal positions of each sequence before this step's tokens
    mm_new: list[NewItems]
    block_tables: torch.Tensor | None = None  # [seqs, width] int32, when any sequence has cached tokens
    all_rows: list[bool] = field(default_factory=list)  # per sequence: logits of every row wanted (prompt_logprobs)
    key_ends: torch.Tensor | None = None  # see AttentionMetadata.key_ends
    state_slots: list[int] | None = None  # each sequence's recurrent-state slot (models with linear attention)
    clear_encoder_cache: bool = False  # rank 0's was cleared since its last prefill: every rank clears its own


@dataclass
class DecodeInputs:
    """One new token per sequence."""

    token_ids: torch.Tensor  # [seqs] each sequence's last token
    positions: torch.Tensor  # [seqs]
    slots: torch.Tensor  # [seqs]
    context_lens: torch.Tensor  # [seqs] tokens in the cache, the new one included
    block_tables: torch.Tensor  # [seqs, width] int32, padded with 0
    run_starts: list[int] | None = None  # see AttentionMetadata.run_starts
    state_slots: list[int] | None = None  # see PrefillInputs.state_slots


StepInputs = PrefillInputs | DecodeInputs


def prepare_step(step: ScheduledStep, model: VisionLanguageModel, block_size: int, reads_runs: bool,
                 encoded: Container[bytes] = ()) -> StepInputs:
    """`reads_runs`: the attention backend reads a sequence's blocks as one run where they are (decode).
    `encoded`: the keys the encoder cache holds."""
    if step.is_prefill:
        return prepare_prefill(step, model, block_size, encoded)
    return prepare_decode(step.seqs, block_size, reads_runs)


def _slot(seq: Sequence, position: int, block_size: int) -> int:
    return seq.block_table[position // block_size] * block_size + position % block_size


def _run_start(blocks: list[int]) -> int:
    """The first block if `blocks` is one ascending run, else -1."""
    first = blocks[0]
    return first if blocks[-1] - first == len(blocks) - 1 and blocks == list(range(first, first + len(blocks))) else -1


def prepare_prefill(step: ScheduledStep, model: VisionLanguageModel, block_size: int,
                    encoded: Container[bytes] = ()) -> PrefillInputs:
    ids, positions, slots, mm_mask, mm_offsets, mm_new, starting, key_ends = [], [], [], [], [], [], [], []
    mm_tokens = set(model.mm_token_ids)
    bidirectional = getattr(model, "bidirectional_mm", False)
    for seq, n in zip(step.seqs, step.num_tokens):
        start, end = seq.num_computed, seq.num_computed + n
        ids.extend(seq.token_ids[start:end])
        slots.extend(_slot(seq, p, block_size) for p in range(start, end))
        # multimodal positions are the prompt's placeholders; generated tokens never are, whatever their id
        # (and a continuation given after the prompt, as in teacher forcing, is text whatever its ids)
        is_mm = [t in mm_tokens for t in seq.token_ids[: seq.text_from]]
        is_mm += [False] * (len(seq) - seq.text_from)
        positions.append(_positions(model, seq, is_mm, start, end))
        mm_mask.extend(is_mm[start:end])
        if bidirectional:
            key_ends.append(_key_ends(seq.mm_runs(mm_tokens), start, end))
        mm_offsets.append(sum(is_mm[:start]))
        # its items' embeddings come at its first step, for this and its later chunks (not at all where its cached
        # prefix holds every multimodal position). Where its cached prefix holds some of them, the embeddings its
        # cached blocks were computed from are taken (from the encoder cache, or from an earlier sequence of this
        # step that brings the same items); otherwise its items are encoded for it, as without the cache.
        if start == seq.num_cached_tokens and seq.mm_inputs and any(is_mm[start:]):
            key = seq.mm_key
            reuse = key is not None and any(is_mm[:start]) and (
                key in encoded or any(key == new.key and new.encode for new in mm_new))
            mm_new.append(NewItems(seq.seq_id, sum(is_mm), key, not reuse))
            if not reuse:
                starting.append(seq.mm_inputs)
    cached = [s.num_computed for s in step.seqs]
    tables = None
    if any(cached):
        width = max(len(s.block_table) for s in step.seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in step.seqs],
                              dtype=torch.int32)
    # prompt log-probs: the rows of a prompt that asked, unless a first pass (before a preemption) gave them
    all_rows = [s.params.prompt_logprobs is not None and s.num_computed < s.num_prompt_tokens
                and len(s.prompt_logprobs or [None]) < s.num_prompt_tokens for s in step.seqs]
    sees_ahead = any(bool((e > torch.arange(len(e)) + s.num_computed + 1).any()) for e, s in zip(key_ends, step.seqs))
    ends = torch.cat(key_ends) if sees_ahead else None  # else causal, the backends' fast path
    return PrefillInputs(torch.tensor(ids), torch.cat(positions, dim=-1), torch.tensor(slots), list(step.num_tokens),
                         torch.tensor(mm_mask), concat_mm_inputs(starting), [s.seq_id for s in step.seqs],
                         cached, step.samples(), mm_offsets, mm_new, tables, all_rows if any(all_rows) else [], ends,
                         _state_slots(step.seqs))


def _state_slots(seqs: list[Sequence]) -> list[int] | None:
    return None if seqs[0].state_slot is None else [s.state_slot for s in seqs]


def _key_ends(runs: list[tuple[int, int]], start: int, end: int) -> torch.Tensor:
    """Per position start..end of a sequence, the end of the keys it sees: the end of its run of placeholders
    (which sees itself whole), else itself."""
    ends = torch.arange(start, end, dtype=torch.int32) + 1
    for first, last in runs:
        if first < end and last > start:
            ends[max(first, start) - start : min(last, end) - start] = last
    return ends


def _positions(model: VisionLanguageModel, seq: Sequence, is_mm: list[bool], start: int, end: int) -> torch.Tensor:
    """Positions of tokens start..end of `seq`: their indices, or with multimodal RoPE [3, tokens], the prompt's
    rows from the model (worked out once per sequence) and index + offset after the prompt."""
    if model.position_rows == 1:
        return torch.arange(start, end)
    if seq.rope_positions is None:
        prompt = seq.num_prompt_tokens
        seq.rope_positions, seq.rope_offset = model.rope_positions(is_mm[:prompt], seq.mm_inputs,
                                                                   seq.token_ids[:prompt])
    prompt = seq.rope_positions.shape[1]
    rows = (torch.arange(start, end) + seq.rope_offset).expand(3, -1).clone()
    if start < prompt:
        rows[:, : min(end, prompt) - start] = seq.rope_positions[:, start : min(end, prompt)]
    return rows


def prepare_decode(seqs: list[Sequence], block_size: int, reads_runs: bool) -> DecodeInputs:
    width = max(len(s.block_table) for s in seqs)
    tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32)
    slots = [_slot(s, len(s) - 1, block_size) for s in seqs]
    return DecodeInputs(  # with multimodal RoPE the three rows agree: one row, offset
        token_ids=torch.tensor([s.last_token for s in seqs]),
        positions=torch.tensor([len(s) - 1 + s.rope_offset for s in seqs]), slots=torch.tensor(slots),
        context_lens=torch.tensor([len(s) for s in seqs]), block_tables=tables,
        run_starts=[_run_start(s.block_table) for s in seqs] if reads_runs else None,
        state_slots=_state_slots(seqs))
