"""The load generator's requests and clock, for any OpenAI-compatible endpoint (ours, vLLM's): `--perf`'s synthetic
requests (black images as data: URLs, random text of an exact token count) sent through the official `openai`
client (httpx underneath, its own SSE parser), as a Poisson process at a request rate or at a fixed concurrency,
each timed per streamed chunk."""
import asyncio
import base64
import io
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from vllm_utils.errors import UserError


@dataclass
class Timing:
    """One request as the client saw it (seconds, perf_counter)."""

    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between successive chunks after the first
    prompt_tokens: int = 0
    output_tokens: int = 0
    start: float = 0.0
    text: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


class TextMaker:
    """Random text that the tokenizer reads back as exactly `n` tokens (no special tokens)."""

    def __init__(self, tokenizer, seed: int) -> None:
        self.tokenizer = tokenizer
        special = set(tokenizer.all_special_ids)
        self.vocab = np.array([i for i in range(len(tokenizer)) if i not in special])
        self.rng = np.random.default_rng(seed)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def text(self, n: int) -> str:
        ids = self.rng.choice(self.vocab, n).tolist()
        text = self.tokenizer.decode(ids)
        for _ in range(10):  # decoding and encoding again may merge or split tokens: trim or top up
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == n:
                return text
            ids = ids[:n] if len(ids) > n else ids + self.rng.choice(self.vocab, n - len(ids)).tolist()
            text = self.tokenizer.decode(ids)
        return text


def black_image_url(height: int, width: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_messages(lead: str, text: str, image_urls: list[str]) -> list[dict]:
    """A user turn: a random word, the images, the random text (the word first makes every request's prefix
    differ, so that no server can share one between requests)."""
    parts = [{"type": "text", "text": lead}] + [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@dataclass(frozen=True)
class Target:
    client: object  # openai.AsyncOpenAI
    model: str
    endpoint: str  # "chat" or "completions"
    output_len: int
    ignore_eos: bool = True


async def send(target: Target, payload, max_tokens: int | None = None) -> Timing:
    """One streamed request (`payload`: chat messages or a completion prompt), timed chunk by chunk."""
    timing = Timing(start=time.perf_counter())
    args = dict(model=target.model, max_tokens=max_tokens or target.output_len, temperature=0.0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": target.ignore_eos})
    last, chunks = timing.start, 0
    try:
        if target.endpoint == "chat":
            stream = await target.client.chat.completions.create(messages=payload, **args)
        else:
            stream = await target.client.completions.create(prompt=payload, **args)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                if chunks == 0:
                    timing.ttft = now - timing.start
                else:
                    timing.itl.append(now - last)
                last, chunks = now, chunks + 1
                choice = chunk.choices[0]
                timing.text += (choice.delta.content or "") if target.endpoint == "chat" else (choice.text or "")
            if chunk.usage:
                timing.prompt_tokens, timing.output_tokens = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
        timing.e2e = time.perf_counter() - timing.start
        timing.output_tokens = timing.output_tokens or chunks
        timing.ok = chunks > 0
        timing.error = "" if chunks else "no tokens came back"
    except Exception as e:  # the request failed: recorded, the run goes on
        timing.error = f"{type(e).__name__}: {e}"[:300]
    return timing


async def run_load(target: Target, payloads: list, request_rate: float, max_concurrency: int | None,
                   seed: int, progress=None) -> tuple[list[Timing], float]:
    """Every payload sent: arrivals a Poisson process at `request_rate` (inf: all at once), at most
    `max_concurrency` in flight. Returns the timings (in payload order) and the wall time from the first send to
    the last answer."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    rng = np.random.default_rng(seed)

    async def one(payload) -> Timing:
        if limit is None:
            timing = await send(target, payload)
        else:
            async with limit:
                timing = await send(target, payload)
        if progress is not None:
            progress(timing)
        return timing

    start = time.perf_counter()
    tasks = []
    for i, payload in enumerate(payloads):
        if i and np.isfinite(request_rate):
            await asyncio.sleep(rng.exponential(1.0 / request_rate))
        tasks.append(asyncio.ensure_future(one(payload)))
    timings = await asyncio.gather(*tasks)
    return list(timings), time.perf_counter() - start


def check_output_len(timings: list[Timing], output_len: int) -> None:
    short = [t for t in timings if t.ok and t.output_tokens != output_len]
    if short:
        raise UserError(f"{len(short)} request(s) came back with other than {output_len} tokens (e.g. "
                        f"{short[0].output_tokens}): the server must take vLLM's ignore_eos, and --input-len + "
                        f"--output-len must fit its max model length")
