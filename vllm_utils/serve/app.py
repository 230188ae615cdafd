"""The HTTP routes, as vLLM's OpenAI-compatible server names them: `/v1/chat/completions`, `/v1/completions`,
`/v1/models`, `/health`, `/metrics`. A request is prepared in a worker thread (content parts parsed by `chat.py`,
rendered by the chat template, processed), handed to the one engine loop, and answered whole or streamed as server-
sent events; a client that goes away has its request aborted at once. Every error a client causes is a 4xx with an
OpenAI-style body; the server goes on serving."""
import asyncio
import json
import threading
import time
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from vllm_utils.chat import parse_messages
from vllm_utils.errors import UserError
from vllm_utils.llm import LLM
from vllm_utils.serve import protocol as api
from vllm_utils.serve.async_engine import AsyncEngine, Delta, Generation, Prepared
from vllm_utils.serve.metrics import ServerMetrics
from vllm_utils.serve.text_stream import TextStream


@dataclass
class ServerState:
    llm: LLM
    model_name: str
    media_root: str | None = None
    api_key: str | None = None
    metrics: ServerMetrics = None
    engine: AsyncEngine = None
    preparing: threading.Lock = field(default_factory=threading.Lock)  # one request processed at a time
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        engine = self.llm.engine
        self.metrics = self.metrics or ServerMetrics(self.model_name, engine.block_manager.num_blocks)
        self.engine = self.engine or AsyncEngine(
            self.llm, lambda e: self.metrics.engine_state(e.engine.scheduler, e.engine.block_manager))
        self.processor = engine.processor
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.config.hf_config.text_config.vocab_size


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        try:
            yield
        finally:
            state.engine.stop()

    app = FastAPI(title="vllm_utils OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    _errors(app)
    app.add_middleware(_Arrival)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if state.api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {state.api_key}":
                return _error(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' with the key "
                                   "the server was started with (--api-key)", "AuthenticationError")
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state.engine.alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "vllm_utils", "root": state.model_name,
                                            "max_model_len": state.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat(body: api.ChatRequest, raw: Request) -> Response:
        arrival = _arrival(raw)
        _check_model(state, body.model)
        params = body.sampling_params(state.llm.get_default_sampling_params(), _default_max_tokens(state))
        prepared = await _prepare(state, _chat_prompt, body)
        return await _answer(state, raw, body, [prepared], params, arrival, chat=True)

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, raw: Request) -> Response:
        arrival = _arrival(raw)
        _check_model(state, body.model)
        params = body.sampling_params(state.llm.get_default_sampling_params(), 16)
        prompts = [body.prompt] if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int)) \
            else body.prompt
        if not prompts:
            raise api.ServerError(400, "'prompt' is empty: give a string, a list of strings or token ids", "prompt")
        prepared = [await _prepare(state, _text_prompt, p) for p in prompts]
        return await _answer(state, raw, body, prepared, params, arrival, chat=False)

    return app


class _Arrival:
    """Stamps each request with the time it reached the app (before its body is read and parsed): TTFT and
    end-to-end latency count from there, as a client counts them from sending."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        scope["vllm_utils.arrival"] = time.perf_counter()
        await self.app(scope, receive, send)


def _arrival(raw: Request) -> float:
    return raw.scope.get("vllm_utils.arrival") or time.perf_counter()


def _errors(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"invalid request: {where or 'body'}: {first.get('msg', 'invalid')}", param=where or None)

    @app.exception_handler(api.ServerError)
    async def server_error(request: Request, exc: api.ServerError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        traceback.print_exception(exc)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "InternalServerError")


def _error(status: int, message: str, kind: str = "BadRequestError", param: str | None = None) -> JSONResponse:
    return JSONResponse(api.error_body(status, message, kind, param), status_code=status)


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise api.ServerError(404, f"The model `{model}` does not exist; this server serves `{state.model_name}` "
                                   f"(GET /v1/models)", "NotFoundError", "model")


def _default_max_tokens(state: ServerState) -> int | None:
    """The model's generation_config max_new_tokens where it sets one, else up to the context length (vLLM's)."""
    return state.processor.generation_config.get("max_new_tokens")


# ---- preparing a prompt (in a worker thread) ---------------------------------------------------------------
async def _prepare(state: ServerState, how, what) -> Prepared:
    def run() -> Prepared:
        with state.preparing:
            return how(state, what)
    return await asyncio.to_thread(run)


def _chat_prompt(state: ServerState, body: api.ChatRequest) -> Prepared:
    processor = state.processor
    if processor.video_token is None and any(isinstance(p, dict) and p.get("type") == "video_url"
                                             for m in body.messages if isinstance(m, dict)
                                             for p in (m.get("content") if isinstance(m.get("content"), list) else [])):
        raise api.ServerError(400, f"`{state.model_name}` takes no video: send images or text", param="messages")
    rendered, images, videos = parse_messages(body.messages, state.media_root)
    continued = body.continue_final_message
    text = processor.render_chat(rendered, body.add_generation_prompt and not continued, None, continued,
                                 **(body.chat_template_kwargs or {}))
    token_ids, mm_inputs = processor.process(text, images, videos)
    return Prepared(text, token_ids, mm_inputs)


def _text_prompt(state: ServerState, prompt: str | list[int]) -> Prepared:
    if isinstance(prompt, str):
        token_ids, _ = state.processor.process(prompt, [], None)
        return Prepared(prompt, token_ids, None)
    if not prompt or any(t < 0 or t >= state.vocab_size for t in prompt):
        raise api.ServerError(400, f"a token-id prompt must be non-empty, each id in [0, {state.vocab_size})",
                              param="prompt")
    return Prepared(None, list(prompt), None)


# ---- answering -------------------------------------------------------------------------------------------
async def _answer(state: ServerState, raw: Request, body, prepared: list[Prepared], params, arrival: float,
                  chat: bool) -> Response:
    if not state.engine.alive:
        raise api.ServerError(503, f"the engine stopped: {state.engine.error or 'shutting down'}", "ServiceUnavailable")
    generation = await state.engine.submit(prepared, params, arrival)
    request_id = api.new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        return StreamingResponse(_stream(state, generation, body, params, request_id, chat),
                                 media_type="text/event-stream")
    whole = asyncio.ensure_future(_collect(state, generation))
    gone = asyncio.ensure_future(_disconnected(raw))
    try:
        await asyncio.wait({whole, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not whole.done():  # the client left (or the server is stopping): its sequences go now
            whole.cancel()
            state.engine.abort(generation)
            state.metrics.abort()
    if not whole.done() or whole.cancelled():
        return Response(status_code=499)
    whole.result()
    n = params.n
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for p in range(generation.num_prompts):
        output = state.llm._output(generation.seqs[p * n:(p + 1) * n])
        prompt_tokens += len(output.prompt_token_ids)
        for completion in output.outputs:
            choices.append((completion.text, completion.finish_reason))
            completion_tokens += len(completion.token_ids)
    make = api.chat_response if chat else api.completion_response
    return JSONResponse(make(request_id, state.model_name, choices, api.usage(prompt_tokens, completion_tokens)))


async def _deltas(generation: Generation):
    """The request's deltas until every output has finished; an engine failure becomes a 503."""
    left = len(generation.seqs)
    while left:
        delta: Delta = await generation.deltas.get()
        if delta.error is not None:
            generation.done = True
            raise api.ServerError(503, delta.error, "ServiceUnavailable")
        now = time.perf_counter()
        generation.token_times[delta.choice] += [now] * len(delta.token_ids)
        left -= delta.finished
        yield delta
    generation.done = True


def _record(state: ServerState, generation: Generation, delta: Delta, n: int) -> None:
    """Metrics of a prompt's first output, when it finishes."""
    if delta.finished and delta.choice % n == 0:
        state.metrics.finished(generation.seqs[delta.choice], generation.arrival, generation.token_times[delta.choice])


async def _collect(state: ServerState, generation: Generation) -> None:
    n = len(generation.seqs) // generation.num_prompts
    async for delta in _deltas(generation):
        _record(state, generation, delta, n)


async def _disconnected(raw: Request) -> None:
    """Returns when the client closes the connection (the body has been read: the next message is the end)."""
    while (await raw.receive())["type"] != "http.disconnect":
        pass


async def _stream(state: ServerState, generation: Generation, body, params, request_id: str, chat: bool):
    n, model = params.n, state.model_name
    texts = [TextStream(state.processor, params) for _ in generation.seqs]
    started = [False] * len(generation.seqs)
    try:
        async for delta in _deltas(generation):
            _record(state, generation, delta, n)
            seq, text = generation.seqs[delta.choice], texts[delta.choice]
            piece = text.final(state.llm, seq) if delta.finished else text.add(delta.token_ids)
            reason = seq.finish_reason if delta.finished else None
            if chat:
                content = {"role": "assistant", "content": piece} if not started[delta.choice] else {"content": piece}
                chunk = api.chat_chunk(request_id, model, delta.choice, content, reason)
            else:
                chunk = api.completion_chunk(request_id, model, delta.choice, piece, reason)
            started[delta.choice] = True
            yield f"data: {json.dumps(chunk)}\n\n"
        if body.include_usage():
            prompt_tokens = sum(generation.seqs[p * n].num_prompt_tokens for p in range(generation.num_prompts))
            used = api.usage(prompt_tokens, sum(s.num_output_tokens for s in generation.seqs))
            obj = "chat.completion.chunk" if chat else "text_completion"
            yield f"data: {json.dumps(api.usage_chunk(request_id, model, obj, used))}\n\n"
    except api.ServerError as e:
        yield f"data: {json.dumps(api.error_body(e.status, e.message, e.kind))}\n\n"
    finally:
        if not generation.done:  # the client left mid-stream: its sequences go now
            state.engine.abort(generation)
            state.metrics.abort()
    yield "data: [DONE]\n\n"
