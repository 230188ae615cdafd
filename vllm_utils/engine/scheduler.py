"""Continuous batching: new prompts are prefilled as soon as blocks and batch slots allow, running sequences
decode one token per step, and when blocks run out the youngest sequence is preempted (its blocks freed; it is
recomputed from its tokens later). With a token budget per step smaller than the longest sequence
(`max_num_batched_tokens` < `max_model_len`), prompts are prefilled in chunks, and the running sequences'
decodes share those steps; a run of positions that attend to each other both ways (an image's, `whole_runs`) is
never split between chunks. With prefix caching, a prompt starts after its longest cached prefix of full blocks
(never its last token: that one's logits are wanted)."""
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from vllm_utils.engine.block_manager import BlockManager
from vllm_utils.engine.sequence import Sequence


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    num_tokens: list[int]  # tokens each sequence computes this step, from its `num_computed` on
    is_prefill: bool  # False: every sequence decodes one token (the decode paths and graphs)

    def samples(self) -> list[bool]:
        """Whether each sequence gets a new token this step (its last chunk, or a decode)."""
        return [s.num_computed + n == len(s) for s, n in zip(self.seqs, self.num_tokens)]


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: list[int],
                 stop_string: Callable[[Sequence], str | None] = lambda seq: None,
                 whole_runs: set[int] | None = None) -> None:
        """`stop_string(seq)`: the stop string its output now holds, if any (the engine detokenizes).
        `whole_runs`: placeholder ids whose runs of positions a chunk must hold whole (bidirectional attention)."""
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.chunked = max_num_batched_tokens < max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.stop_string = stop_string
        self.whole_runs = whole_runs
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.prefix_queries = 0  # tokens of admitted sequences looked up in the prefix cache, and found there
        self.prefix_hits = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        if self.chunked:
            return self._schedule_chunked()
        prefill, num_tokens = [], 0
        while self.waiting and len(self.running) + len(prefill) < self.max_num_seqs:
            seq = self.waiting[0]
            if prefill and num_tokens + len(seq) > self.max_num_batched_tokens:
                break
            if not self._admit(seq):
                break
            num_tokens += len(seq)
            prefill.append(self.waiting.popleft())
            self._computes(seq, len(seq) - seq.num_computed)
        if prefill:
            self.running.extend(prefill)
            return ScheduledStep(prefill, [len(s) - s.num_computed for s in prefill], True)
        decode = []
        while self.running:
            seq = self.running.popleft()
            if self._reserve_next_token(seq):
                decode.append(seq)
                self._computes(seq, 1)
        self.running.extend(decode)
        return ScheduledStep(decode, [1] * len(decode), False)

    def _schedule_chunked(self) -> ScheduledStep:
        """Within the token budget, oldest first: one token for each decoding sequence, the next chunk of each
        prompt under way, then chunks of new prompts."""
        budget, seqs, counts, kept = self.max_num_batched_tokens, [], [], deque()
        while self.running and budget > 0:
            seq = self.running.popleft()
            remaining = len(seq) - seq.num_computed
            if remaining > 1 or self._reserve_next_token(seq):  # a prompt's blocks were allocated whole
                seqs.append(seq)
                counts.append(self._computes(seq, self._chunk(seq, min(remaining, budget))))
                budget -= counts[-1]
                kept.append(seq)
        self.running = kept + self.running  # those the budget did not reach wait for the next step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and self._admit(self.waiting[0]):
            seq = self.waiting.popleft()
            seqs.append(seq)
            counts.append(self._computes(seq, self._chunk(seq, min(len(seq) - seq.num_computed, budget))))
            budget -= counts[-1]
            self.running.append(seq)
        # a decode computes each sequence's newest token after a prefill of its prompt (a prompt whose cached prefix
        # leaves one token is a prefill: its positions and items are the prefill's work)
        is_prefill = any(len(s) - s.num_computed > 1 or s.num_computed < s.num_prompt_tokens for s in seqs)
        return ScheduledStep(seqs, counts, is_prefill)

    def _computes(self, seq: Sequence, count: int) -> int:
        """Offers the full blocks this step completes to the prefix cache (a sequence admitted later in this step
        may start after them: each layer stores the step's keys and values before any sequence attends); returns
        `count`."""
        self.blocks.cache_computed(seq, seq.num_computed + count)
        return count

    def _chunk(self, seq: Sequence, count: int) -> int:
        """`count` tokens of `seq` from its `num_computed` on, cut before a whole run that would not fit, or
        stretched past the budget to the end of a run that starts at the chunk and is longer than it."""
        if self.whole_runs is None:
            return count
        start, end = seq.num_computed, seq.num_computed + count
        for first, last in seq.mm_runs(self.whole_runs):
            if first < end < last:
                return first - start if first > start else last - start
        return count

    def _admit(self, seq: Sequence) -> bool:
        """Allocates the blocks of a waiting sequence's tokens, if they are free (those of its cached prefix
        shared)."""
        # never its last token (its logits are wanted), nor with prompt log-probs (every row's are). The cached
        # blocks may end inside a whole run: their keys and values were computed with the run whole (the same
        # item's), and the rest of the run is computed together, seeing them.
        looks_up = self.blocks.cache is not None and seq.params.prompt_logprobs is None
        hits = self.blocks.cached_prefix(seq, len(seq) - 1) if looks_up else []
        if not self.blocks.can_allocate(seq, hits):
            return False
        self.blocks.allocate(seq, hits)
        if looks_up:
            self.prefix_queries += len(seq)
            self.prefix_hits += seq.num_cached_tokens
        if seq.times.first_scheduled is None:
            seq.times.first_scheduled = time.perf_counter()
        return True

    def _reserve_next_token(self, seq: Sequence) -> bool:
        """Room for a running sequence's next token, preempting the youngest sequences (`seq` itself last) while
        blocks run out. False if `seq` was preempted."""
        while not self.blocks.can_append(seq):
            if self.running:
                self._preempt(self.running.pop())
            else:
                self._preempt(seq)
                return False
        self.blocks.append(seq)
        return True

    def _preempt(self, seq: Sequence) -> None:
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.num_computed = 0
        self.blocks.free(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, step: ScheduledStep, token_ids: list[int],
                    logprobs: list[dict | None] | None) -> list[Sequence]:
        """Counts the computed tokens, appends each new token (`token_ids`: one per sampling sequence, in step
        order), and retires the sequences that are done."""
        now = time.perf_counter()
        sampled = [seq for seq, samples in zip(step.seqs, step.samples()) if samples]
        for seq, n in zip(step.seqs, step.num_tokens):
            seq.num_computed += n
        finished = []
        for i, (seq, token) in enumerate(zip(sampled, token_ids)):
            seq.token_ids.append(token)
            seq.times.token_times.append(now)
            if logprobs is not None and seq.params.logprobs is not None:
                seq.logprobs.append(logprobs[i])
            params = seq.params
            early = seq.num_output_tokens <= params.min_tokens  # min_tokens masked these: only the count ends it
            if not early and not params.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason = "stop"
            elif not early and token in params.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            elif (stop := self.stop_string(seq)) is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop
            elif seq.num_output_tokens >= seq.max_output or len(seq) >= self.max_model_len:
                seq.finish_reason = "length"
            else:
                continue
            self.blocks.free(seq)
            self.running.remove(seq)
            finished.append(seq)
        return finished
