from dataclasses import dataclass, field

from vllm_utils.errors import UserError


@dataclass
class SamplingParams:
    """How tokens are picked and when a request stops (vLLM's names and meanings)."""

    temperature: float = 1.0  # 0 means greedy
    top_k: int = -1  # -1: all tokens
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False  # return the log-probability of each chosen token
    # vLLM's prompt_logprobs: for each prompt token after the first, its log-prob given the tokens before it, with
    # the log-probs of the `prompt_logprobs` most likely tokens at that position (None: off)
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise UserError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise UserError(f"prompt_logprobs must be None (off) or >= 0, got {self.prompt_logprobs}")
        if self.max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
