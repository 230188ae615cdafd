"""`--perf`: a warm-up request, then `--num-iters` timed runs of `--num-prompts` synthetic requests
(at most `--batch-size` at once), each exactly `--input-len` prompt and `--output-len` output tokens."""
import argparse
import json
import sys
import time

from vllm_utils import threads
from vllm_utils.bench.metrics import TimedRun, seed_perf_info, summarize
from vllm_utils.bench.preflight import check_perf_lengths
from vllm_utils.progress import phase
from vllm_utils.bench.report import environment, flatten, write_csv, write_json
from vllm_utils.bench.synthetic import SyntheticRequest, perf_images, perf_video, synthetic_requests
from vllm_utils.config import DEFAULT_MAX_NUM_SEQS
from vllm_utils.errors import UserError
from vllm_utils.sampling_params import SamplingParams


def check_lengths(args: argparse.Namespace) -> None:
    for flag, value in (("--input-len", args.input_len), ("--output-len", args.output_len),
                        ("--num-prompts", args.num_prompts), ("--num-iters", args.num_iters)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.max_model_len is not None and args.input_len + args.output_len > args.max_model_len:
        raise UserError(f"--input-len {args.input_len} + --output-len {args.output_len} exceeds --max-model-len "
                        f"{args.max_model_len}; raise --max-model-len or shorten the request")


def _as_prompts(requests: list[SyntheticRequest]) -> list[dict]:
    return [r.as_prompt() for r in requests]


def timed_run(llm, requests: list[SyntheticRequest], params: SamplingParams) -> TimedRun:
    engine = llm.engine
    engine.reset_stats()
    engine.platform.synchronize(engine.device)
    start = time.perf_counter()
    outputs = llm.generate(_as_prompts(requests), params)
    wall = time.perf_counter() - start
    for request, out in zip(requests, outputs):
        if len(out.prompt_token_ids) != len(request.prompt_token_ids) or len(out.outputs[0].token_ids) != params.max_tokens:
            raise RuntimeError("a request did not keep its exact input/output length")
    return TimedRun(wall, outputs, engine.stats)


def run_perf(args: argparse.Namespace, resolve_config, make_llm) -> None:
    """`resolve_config(args)` gives the resolved engine configuration, `make_llm(args, config)` builds the backend
    (our LLM, or HF behind the same interface)."""
    args.output_len = 128 if args.output_len is None else args.output_len
    check_lengths(args)
    if args.batch_size is None:
        args.batch_size = min(args.num_prompts, DEFAULT_MAX_NUM_SEQS)
    if args.model is None:
        from vllm_utils.bench.tiny_model import default_demo_assets

        args.model = default_demo_assets()[0]
        print(f"No --model given: benchmarking the tiny random LLaVA at {args.model}; pass --model PATH "
              f"(or --model llava-hf/llava-1.5-7b-hf --load-format dummy).", file=sys.stderr)
    config = resolve_config(args)
    check_perf_lengths(args, config)  # before the weights load
    llm = make_llm(args, config)
    video = perf_video(args, llm.engine.processor)
    images = [] if video is not None else perf_images(args, llm.engine.processor)
    engine = llm.engine
    warm_up(llm, args, images, video)
    engine.platform.reset_peak_memory(engine.device)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    runs = []
    for i in range(args.num_iters):
        requests = synthetic_requests(engine.processor, args.input_len, args.num_prompts, images, seed=args.seed + i,
                                      video=video)
        with phase(f"Timed run {i + 1}/{args.num_iters}: {args.num_prompts} request(s) of {args.input_len} prompt "
                   f"+ {args.output_len} output tokens", f"Timed run {i + 1}/{args.num_iters}"):
            runs.append(timed_run(llm, requests, params))
    summary = summarize(runs, args.output_len)
    summary["image_tokens_per_request"] = requests[0].num_image_tokens
    summary["text_tokens_per_request"] = requests[0].num_text_tokens
    paged = args.backend != "hf"  # HF has no paged KV cache: its block figures are "n/a", not 0
    summary["kv_blocks_total"] = engine.block_manager.num_blocks if paged else None
    summary["peak_kv_blocks_used"] = summary["peak_kv_blocks_used"] if paged else None
    summary["peak_memory_gib"] = engine.platform.peak_memory_bytes(engine.device) / 2**30

    info = seed_perf_info(summary)
    if engine.device.type == "cpu":
        info["cpu_threads"] = cpu_threads(engine.platform)
    print("***Perf Info***")
    print(json.dumps(info, indent=4))
    print_details(summary, "video" if video is not None else "image")
    if "cpu_threads" in info:
        team = getattr(engine.platform, "team", None)
        followed = team.summary() if team is not None else ""
        print(f"CPU threads: {info['cpu_threads']} ({threads.describe(info['cpu_threads'])})"
              + (f"; {followed}" if followed else ""))
    settings = perf_settings(args, engine, synthetic_video=video is not None and not args.input_video)
    save_reports({**settings, **info, **flatten(summary)}, args.output_json,
                 lambda: {"settings": settings, "perf_info": info, "metrics": summary,
                          "environment": environment(engine.device)})


def warm_up(llm, args: argparse.Namespace, images: list, video=None) -> None:
    """One untimed request: first-use costs (kernel builds, allocator growth) stay out of the figures."""
    engine = llm.engine
    requests = synthetic_requests(engine.processor, args.input_len, 1, images, seed=args.seed + 10_000, video=video)
    params = SamplingParams(temperature=0, max_tokens=min(args.output_len, 8), ignore_eos=True)
    with phase(f"Warm-up: 1 request of {args.input_len} + {params.max_tokens} tokens, not timed", "Warm-up"):
        llm.generate(_as_prompts(requests), params, use_tqdm=False)


def save_reports(rows: dict[str, object], json_path: str | None, document) -> None:
    """Writes every report it can; if one fails, says which after trying the others (the figures are
    printed above either way). `document()` builds the JSON's content."""
    writers = [("the result CSV", lambda: write_csv(rows))]
    if json_path:
        writers.append(("--output-json", lambda: write_json(json_path, document())))
    failed = []
    for what, write in writers:
        try:
            print(f"Saved to {write()}", file=sys.stderr)
        except OSError as e:
            failed.append(f"{what} ({e.strerror or e})")
    if failed:
        raise UserError(f"could not write {' or '.join(failed)}; the figures printed above are complete")


def perf_settings(args: argparse.Namespace, engine, synthetic_video: bool = False) -> dict[str, object]:
    return {
        "model": args.model, "model_type": engine.config.model_type, "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."), "tensor_parallel_size": args.tensor_parallel_size,
        "max_model_len": engine.max_model_len, "input_len": args.input_len, "output_len": args.output_len,
        "num_prompts": args.num_prompts, "batch_size": engine.config.max_num_seqs, "block_size": args.block_size,
        "enforce_eager": args.enforce_eager, "load_format": args.load_format, "num_iters": args.num_iters,
        "seed": args.seed, "input_image": ";".join(args.input_image) or ("" if synthetic_video else "black"),
        "mm_per_prompt": args.mm_per_prompt, "input_vision_shape": args.input_vision_shape or "",
        "input_video": ";".join(args.input_video) or ("black" if synthetic_video else ""),
        "num_frames": args.num_frames or "",
        "backend": args.backend, "max_num_batched_tokens": engine.config.max_num_batched_tokens,
        "num_kv_blocks": args.num_kv_blocks if args.num_kv_blocks is not None else "auto",
    }


def cpu_threads(platform) -> int:
    """The threads the CPU path runs: where the team follows the load, its full size."""
    team = getattr(platform, "team", None)
    if team is not None:
        return team.full
    import torch

    return torch.get_num_threads()


def print_details(s: dict, vision: str = "image") -> None:
    """`vision`: what the requests' multimodal positions hold (image or video)."""
    rows = [("TTFT (ms)", s["ttft_ms"]), ("TPOT (ms)", s["tpot_ms"]), ("inter-token latency (ms)", s["itl_ms"])]
    print(f"{'':26}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name, d in rows:
        print(f"{name:26}{d['mean']:10.2f}{d['p50']:10.2f}{d['p90']:10.2f}{d['p99']:10.2f}")
    print(f"prefill throughput: {s['prefill_tokens_per_second']:.1f} prompt tokens/s; "
          f"decode throughput (whole batch): {s['decode_tokens_per_second']:.1f} tokens/s")
    blocks = "n/a" if s["kv_blocks_total"] is None else f"{s['peak_kv_blocks_used']} of {s['kv_blocks_total']}"
    print(f"tokens per request: {s['image_tokens_per_request']} {vision} + {s['text_tokens_per_request']} text; "
          f"KV-cache blocks used at peak: {blocks}; "
          f"peak memory: {s['peak_memory_gib']:.2f} GiB; preemptions: {s['preemptions']}")
