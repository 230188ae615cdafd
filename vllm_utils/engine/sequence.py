"""One request as the engine sees it: its tokens, its KV-cache blocks, its timings."""
import time
from dataclasses import dataclass, field
from itertools import count

import torch

from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.sampling_params import SamplingParams


@dataclass
class SequenceTimes:
    arrival: float = 0.0
    first_scheduled: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each output token was produced


_ids = count()


class Sequence:
    def __init__(self, token_ids: list[int], params: SamplingParams, mm_inputs: MultiModalInputs | None = None,
                 prompt: str | None = None, text_from: int | None = None, index: int = 0,
                 max_output: int | None = None) -> None:
        """`text_from`: prompt positions from there on are text whatever their id (a continuation given after the
        prompt, as in teacher forcing); by default the whole prompt may hold multimodal placeholders. `index`: which
        of its request's n outputs this is. `max_output`: the most tokens it may generate."""
        self.seq_id = next(_ids)
        self.prompt = prompt
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.text_from = self.num_prompt_tokens if text_from is None else text_from
        self.params = params
        self.mm_inputs = mm_inputs or None  # dropped when the sequence finishes
        # multimodal RoPE: the prompt's positions [3, prompt tokens] and the offset of later tokens' positions
        self.rope_positions: torch.Tensor | None = None
        self.rope_offset = 0
        self._mm_runs: list[tuple[int, int]] | None = None
        self.block_table: list[int] = []
        self.state_slot: int | None = None  # its slot of the recurrent state (models with linear attention)
        self.num_computed = 0  # tokens whose K/V the cache holds
        # prefix caching: (positions, content hash) of each multimodal item (and one hash of them all), the hashes
        # of its full blocks, how many of its first tokens the cache gave it when it was admitted, and how many of
        # its blocks it offered
        self.mm_hashes: list[tuple[int, bytes]] | None = None
        self.mm_key: bytes | None = None  # one hash of all its items: the encoder cache's key
        self.block_hashes: list[bytes] = []
        self.num_cached_tokens = 0
        self.num_registered_blocks = 0
        self.index = index
        self.max_output = max_output if max_output is not None else params.max_tokens
        self.logprobs: list[dict[int, tuple[float, int]]] = []  # per output token, with params.logprobs
        # set by the first prefill, if asked: per prompt token {token: (log-prob, rank)}, None for the first
        self.prompt_logprobs: list[dict[int, tuple[float, int]] | None] | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = ""  # the output's text, as far as stop strings have been looked for
        self.stop_index = 0  # where the stop string that ended it starts in that text
        self.num_preemptions = 0
        self.times = SequenceTimes(arrival=time.perf_counter())
        self.generator = None
        if params.seed is not None:  # output i > 0 of n draws from its own generator, derived from the seed
            seed = params.seed if index == 0 else (params.seed * 1_000_003 + index) % 2**63
            self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    def mm_runs(self, mm_token_ids: set[int]) -> list[tuple[int, int]]:
        """The prompt's runs of consecutive multimodal placeholders, as [start, end) positions (worked out once;
        a continuation after `text_from` is text whatever its ids)."""
        if self._mm_runs is None:
            runs, start = [], None
            for p, token in enumerate(self.token_ids[: self.text_from] + [None]):
                if token in mm_token_ids and start is None:
                    start = p
                elif token not in mm_token_ids and start is not None:
                    runs.append((start, p))
                    start = None
            self._mm_runs = runs
        return self._mm_runs

    def num_blocks(self, block_size: int) -> int:
        """Blocks that hold every token of the sequence so far."""
        return (len(self) + block_size - 1) // block_size
