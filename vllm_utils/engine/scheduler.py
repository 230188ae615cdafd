"""Continuous batching: new prompts are prefilled as soon as blocks and batch slots allow, running
sequences decode one token per step, and when blocks run out the youngest sequence is preempted
(its blocks freed; it is recomputed from its tokens later)."""
import time
from collections import deque

from vllm_utils.engine.block_manager import BlockManager
from vllm_utils.engine.sequence import Sequence


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_id: int | None) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences to run this step, and whether the step is a prefill."""
        prefill, num_tokens = [], 0
        while self.waiting and len(self.running) + len(prefill) < self.max_num_seqs:
            seq = self.waiting[0]
            if prefill and num_tokens + len(seq) > self.max_num_batched_tokens:
                break
            if not self.blocks.can_allocate(seq):
                break
            self.blocks.allocate(seq)
            if seq.times.first_scheduled is None:
                seq.times.first_scheduled = time.perf_counter()
            num_tokens += len(seq)
            prefill.append(self.waiting.popleft())
        if prefill:
            self.running.extend(prefill)
            return prefill, True

        decode = []
        while self.running:
            seq = self.running.popleft()
            while not self.blocks.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.blocks.append(seq)
                decode.append(seq)
        self.running.extend(decode)
        return decode, False

    def _preempt(self, seq: Sequence) -> None:
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.blocks.free(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int], logprobs: list[float] | None) -> list[Sequence]:
        """Appends each new token, and retires the sequences that are done."""
        now = time.perf_counter()
        finished = []
        for i, (seq, token) in enumerate(zip(seqs, token_ids)):
            seq.token_ids.append(token)
            seq.times.token_times.append(now)
            if logprobs is not None and seq.params.logprobs:
                seq.logprobs.append(logprobs[i])
            params = seq.params
            if not params.ignore_eos and (token == self.eos_token_id or token in params.stop_token_ids):
                seq.finish_reason = "stop"
            elif seq.num_output_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
                seq.finish_reason = "length"
            else:
                continue
            self.blocks.free(seq)
            self.running.remove(seq)
            finished.append(seq)
        return finished
