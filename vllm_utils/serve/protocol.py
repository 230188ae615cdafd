"""The OpenAI API's shapes, as vLLM's server takes them: chat and completion requests (OpenAI's fields and vLLM's
sampling extras: top_k, repetition_penalty, min_tokens, ignore_eos, ...), the SamplingParams they mean, the
responses and stream chunks, and OpenAI-style error bodies. A field that would change the output and that this
engine does not implement is refused by name; unknown fields are ignored, as vLLM ignores them."""
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict

from vllm_utils.errors import UserError
from vllm_utils.sampling_params import SamplingParams


class ServerError(Exception):
    """An error a client caused (or the server's state): the HTTP status and an OpenAI-style body."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_body(status: int, message: str, kind: str = "BadRequestError", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: dict | None = None
    # refused unless left unset: this engine does not implement them
    logit_bias: dict | None = None
    logprobs: Any = None
    tools: list | None = None
    response_format: dict | None = None
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def sampling_params(self, defaults: SamplingParams, default_max_tokens: int | None) -> SamplingParams:
        refused = {"logit_bias": self.logit_bias is not None, "tools": bool(self.tools), "echo": self.echo,
                   "best_of": self.best_of not in (None, 1), "suffix": self.suffix is not None,
                   "logprobs": self.logprobs not in (None, False)}
        for name, given in refused.items():
            if given:
                raise ServerError(400, f"'{name}' is not supported by this server; leave it out", param=name)
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ServerError(400, "response_format other than text is not supported here", param="response_format")
        max_tokens = getattr(self, "max_completion_tokens", None) or self.max_tokens or default_max_tokens
        top_k = self.top_k if self.top_k is not None else defaults.top_k
        try:
            return SamplingParams(
                n=self.n, temperature=_or(self.temperature, defaults.temperature),
                top_p=_or(self.top_p, defaults.top_p),
                top_k=top_k, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
                stop_token_ids=self.stop_token_ids, seed=self.seed, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=_or(self.repetition_penalty, defaults.repetition_penalty),
                ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output)
        except UserError as e:
            raise ServerError(400, str(e)) from None


def _or(value, default):
    return default if value is None else value


class ChatRequest(_Sampling):
    messages: list[dict]
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(request_id: str, model: str, choices: list[tuple[str, str | None]], used: dict) -> dict:
    """`choices`: (text, finish reason) per output."""
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason} for i, (text, reason) in enumerate(choices)],
            "usage": used}


def completion_response(request_id: str, model: str, choices: list[tuple[str, str | None]], used: dict) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                        for i, (text, reason) in enumerate(choices)],
            "usage": used}


def chat_chunk(request_id: str, model: str, index: int, delta: dict, reason: str | None = None) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]}


def completion_chunk(request_id: str, model: str, index: int, text: str, reason: str | None = None) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]}


def usage_chunk(request_id: str, model: str, obj: str, used: dict) -> dict:
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": used}
