"""What `LLM.generate` returns, as vLLM shapes it: a `RequestOutput` per prompt holding `n` `CompletionOutput`s, and
log-probabilities as `Logprob` entries by token id."""
from dataclasses import dataclass

from vllm_utils.engine.sequence import SequenceTimes


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1: the likeliest token there
    decoded_token: str | None = None


# per position: {token id: Logprob} for the position's token and its likeliest ones
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int  # which of the prompt's n outputs
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None  # with logprobs: the sum of the chosen tokens' log-probs
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop" (EOS, a stop token or string) or "length"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it; None for EOS or length

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None  # with prompt_logprobs; None for the first token
    outputs: list[CompletionOutput]
    finished: bool
    times: SequenceTimes  # when the request arrived, was first scheduled and got each token (its first output's)
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (at its last admission), as vLLM's
