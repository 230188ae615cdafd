"""`python3 -m vllm_utils.serve --model PATH`: the OpenAI-compatible server, with the CLI's model and engine flags
(`--model`, `--dtype`, `--max-model-len`, `--batch-size` (vLLM's max_num_seqs), `--block-size`, ...) and vLLM's
server flags (`--host`, `--port`, `--api-key`, `--served-model-name`, `--allowed-local-media-path`). Binds
127.0.0.1 unless told otherwise; SIGTERM or Ctrl-C ends it cleanly (requests in flight get a few seconds)."""
import argparse
import os
import sys
from dataclasses import replace
from types import SimpleNamespace

from vllm_utils.benchmark_vision_language import _HelpFormatter, _model_flags, _Parser
from vllm_utils.errors import UserError, one_line

PROG = "python3 -m vllm_utils.serve"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="An OpenAI-compatible server (/v1/chat/completions, /v1/completions, "
                                       "/v1/models, /health, /metrics) on the engine.",
                formatter_class=_HelpFormatter, allow_abbrev=False)
    _model_flags(p.add_argument_group("model and engine (as the benchmark CLI's)"))
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $VLLM_API_KEY, else none)")
    s.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    s.add_argument("--allowed-local-media-path", default=None,
                   help="a folder whose image and video files requests may name (file:// URLs or paths); none "
                        "without it")
    s.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")
    s.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds requests in flight get to finish on SIGTERM")
    return p


def given(argv: list[str] | None) -> set[str]:
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def open_llm(args: argparse.Namespace, flags: set[str]):
    """The engine of the flags, as the CLI's plan builds it (the family's tiny model without --model). Returns
    (LLM, model folder)."""
    from vllm_utils.config import DEFAULT_MAX_NUM_SEQS
    from vllm_utils.modes.plan import config_processor, resolve_config
    from vllm_utils.modes.spec import COUNTS, engine_spec, flag

    if args.backend != "engine":
        raise UserError("the server runs our engine: drop --backend hf")
    if "output_len" in flags:
        raise UserError("--output-len: each request sets its own max_tokens; drop it")
    for dest in COUNTS:
        value = getattr(args, dest, None)
        if value is not None and value < 1:
            raise UserError(f"{flag(dest)} must be >= 1, got {value}")
    if args.allowed_local_media_path is not None and not os.path.isdir(args.allowed_local_media_path):
        raise UserError(f"--allowed-local-media-path '{args.allowed_local_media_path}' is not a folder")
    spec = engine_spec(args, flags)
    model = spec.model
    if model is None:
        from vllm_utils.testing.default_model import default_model

        model = default_model(spec.model_type or "llava").folder
        print(f"No --model given: serving the tiny random {spec.model_type or 'llava'} model at {model} (its text "
              f"is gibberish by design)", file=sys.stderr)
    config = resolve_config(SimpleNamespace(engine=spec), model)
    batch = args.batch_size or DEFAULT_MAX_NUM_SEQS
    config = replace(config, max_num_seqs=batch, engine=replace(config.engine, max_num_seqs=batch))
    processor = config_processor(config, spec.load_format == "dummy")
    if processor.tokenizer is None:
        raise UserError(f"--model {model} has no tokenizer files, and the server tokenizes text: point --model at "
                        f"the complete model folder")
    from vllm_utils.llm import LLM

    return LLM(config, processor=processor), model


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from vllm_utils.serve import SERVE_PACKAGES, require

        require(SERVE_PACKAGES, "the server")
        from vllm_utils.benchmark_vision_language import quiet_libraries

        quiet_libraries()
        llm, model = open_llm(args, given(argv))
    except Exception as e:
        why = one_line(e)
        if why is None:
            raise
        print(f"error: {why}", file=sys.stderr)
        return 1
    import uvicorn

    from vllm_utils.serve.app import ServerState, build_app

    state = ServerState(llm, args.served_model_name or args.model or model, args.allowed_local_media_path,
                        args.api_key)
    app = build_app(state)
    print(f"Serving {state.model_name} on http://{args.host}:{args.port} (OpenAI API under /v1; KV cache "
          f"{llm.engine.block_manager.num_blocks} blocks of {llm.engine.config.engine.block_size} tokens; at most "
          f"{llm.engine.config.max_num_seqs} requests at once)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            """SIGTERM or Ctrl-C: a graceful shutdown, then exit status 0 (uvicorn would raise the signal again)."""
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()

    try:
        Server(config).run()
    finally:
        llm.engine.shutdown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
