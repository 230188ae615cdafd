"""How tokens are picked and when a request stops: vLLM's `SamplingParams`, its names and meanings, each value checked
when it is made (one line naming the field), and vLLM's fields this engine does not implement refused by name."""
import math
from typing import Any

from vllm_utils.errors import UserError

# vLLM's fields that would change the outputs and that this engine does not implement: refused unless left at these
_UNSUPPORTED = {"best_of": None, "use_beam_search": False, "logits_processors": None, "guided_decoding": None,
                "structured_outputs": None, "logit_bias": None, "allowed_token_ids": None, "bad_words": None,
                "truncate_prompt_tokens": None, "min_p": 0.0}
# vLLM's fields that change nothing here (how outputs are delivered): accepted at any value
_ACCEPTED = ("output_kind", "spaces_between_special_tokens", "extra_args")


class SamplingParams:
    """n: outputs per prompt (each its own sample); presence_penalty / frequency_penalty: subtracted from the logit of
    each token the output holds, once / per occurrence (OpenAI's); repetition_penalty: divides the positive logits
    (multiplies the negative ones) of every token of the prompt and the output (HF's, vLLM's); temperature (0:
    greedy), top_k (-1: all), top_p; seed: the request's own generator (output i > 0 of n draws from its own,
    derived from the seed); stop: strings ending the output, cut from its text unless include_stop_str_in_output;
    stop_token_ids: more tokens ending it (kept in its token ids); ignore_eos; max_tokens (None: up to the context
    length); min_tokens: neither EOS nor a stop token nor a stop string before that many; logprobs: per output
    token the log-probabilities of the `logprobs` likeliest tokens and of the chosen one (0: the chosen only), under
    the model's own distribution; prompt_logprobs: the same for each prompt token after the first;
    skip_special_tokens: leave them out of the text; detokenize: False leaves the text empty."""

    def __init__(self, n: int = 1, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 repetition_penalty: float = 1.0, temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1,
                 seed: int | None = None, stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
                 include_stop_str_in_output: bool = False, ignore_eos: bool = False, max_tokens: int | None = 16,
                 min_tokens: int = 0, logprobs: int | None = None, prompt_logprobs: int | None = None,
                 skip_special_tokens: bool = True, detokenize: bool = True, **others: Any) -> None:
        _refuse_others(others)
        self.n = _int("n", n, 1)
        self.presence_penalty = _float("presence_penalty", presence_penalty, -2.0, 2.0)
        self.frequency_penalty = _float("frequency_penalty", frequency_penalty, -2.0, 2.0)
        self.repetition_penalty = _float("repetition_penalty", repetition_penalty, 0.0, math.inf, low_open=True)
        self.temperature = _float("temperature", temperature, 0.0, math.inf)
        self.top_p = _float("top_p", top_p, 0.0, 1.0, low_open=True)
        self.top_k = _int("top_k", top_k, -1) or -1  # 0 and -1: every token (vLLM's old and new spellings)
        self.seed = None if seed is None or seed == -1 else _int("seed", seed, -(2**63))  # -1: vLLM's "random"
        if stop is not None and not isinstance(stop, (str, list, tuple)):
            raise UserError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
        self.stop = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            raise UserError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
        if stop_token_ids is not None and not isinstance(stop_token_ids, (list, tuple)):
            raise UserError(f"stop_token_ids must be a list of token ids, got {stop_token_ids!r}")
        self.stop_token_ids = [_int("stop_token_ids", t, 0) for t in (stop_token_ids or [])]
        self.include_stop_str_in_output = bool(include_stop_str_in_output)
        self.ignore_eos = bool(ignore_eos)
        self.max_tokens = None if max_tokens is None else _int("max_tokens", max_tokens, 1)
        self.min_tokens = _int("min_tokens", min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise UserError(f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})")
        # True is vLLM's 1; -1 the whole vocabulary
        self.logprobs = None if logprobs is None else _int("logprobs", _bool_as_int(logprobs), -1)
        self.prompt_logprobs = None if prompt_logprobs is None else \
            _int("prompt_logprobs", _bool_as_int(prompt_logprobs), -1)
        self.skip_special_tokens = bool(skip_special_tokens)
        self.detokenize = bool(detokenize)
        if self.stop and not self.detokenize:
            raise UserError("stop strings are looked for in the text: they need detokenize=True")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether a penalty changes the logits (then the plain argmax is not the greedy token)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def replace(self, **changes: Any) -> "SamplingParams":
        return SamplingParams(**{**self.__dict__, **changes})

    def clone(self) -> "SamplingParams":
        return self.replace()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SamplingParams) and self.__dict__ == other.__dict__

    def __repr__(self) -> str:
        return "SamplingParams(" + ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items()) + ")"


def generation_defaults(generation_config: dict) -> SamplingParams:
    """vLLM's default SamplingParams, overridden where a model's generation_config.json sets them (vLLM's
    generation_config="auto"): temperature, top_p, top_k, repetition_penalty, max_new_tokens."""
    keys = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
            "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
    return SamplingParams(**{ours: generation_config[theirs] for theirs, ours in keys.items()
                             if generation_config.get(theirs) is not None})


def find_stop(text: str, stops: list[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest stop string in `text` (from `start`): (its index, the string); None if none is there."""
    found = [(text.find(s, start), s) for s in stops]
    found = [(i, s) for i, s in found if i >= 0]
    return min(found) if found else None


def _refuse_others(others: dict[str, Any]) -> None:
    for name, value in others.items():
        if name in _ACCEPTED:
            continue
        if name in _UNSUPPORTED:
            if value != _UNSUPPORTED[name]:
                raise UserError(f"SamplingParams {name}={value!r} is not supported here; leave it at "
                                f"{_UNSUPPORTED[name]!r}")
            continue
        raise UserError(f"SamplingParams has no field '{name}'")


def _bool_as_int(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value


def _float(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or value > high or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else \
            f"{'>' if low_open else '>='} {low:g}"
        raise UserError(f"{name} must be a finite number {'in ' if math.isfinite(high) else ''}{bounds}, got "
                        f"{value!r}")
    return float(value)


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
    return value
