"""The load generator's figures from the client's timings, printed and written as `--perf` prints and writes its
own: the seed's `***Perf Info***` keys (the wall time of the run, per output token, requests/s, output tokens/s,
TTFT as the prefill latency, the mean inter-token gap as the decode latency), then TTFT, TPOT, inter-token and
end-to-end latency as mean/p50/p90/p99, throughput and goodput; the result CSV and `--output-json`."""
import argparse
import json
import math
import platform
import sys

import numpy as np

from vllm_utils.errors import UserError
from vllm_utils.modes.environment import cpu_model, package_versions
from vllm_utils.modes.metrics import distribution, seed_perf_info
from vllm_utils.modes.report import csv_figures, save_reports
from vllm_utils.modes.spec import ReportSpec
from vllm_utils.serve.loadgen import Timing

SLO_FIGURES = {"ttft": lambda t: t.ttft, "tpot": lambda t: t.tpot, "e2el": lambda t: t.e2e}


def summarize(timings: list[Timing], wall: float, output_len: int, slos: dict[str, float]) -> dict:
    ok = [t for t in timings if t.ok]
    out_tokens, in_tokens = sum(t.output_tokens for t in ok), sum(t.prompt_tokens for t in ok)
    gaps = [g for t in ok for g in t.itl]
    inputs = [t.prompt_tokens for t in ok] or [0]
    summary = {
        "wall_seconds": wall,
        "requests": len(ok),
        "failed": len(timings) - len(ok),
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "latency_per_token_s": wall / output_len,
        "requests_per_s": len(ok) / wall,
        "output_tokens_per_s": out_tokens / wall,
        "total_tokens_per_s": (in_tokens + out_tokens) / wall,
        "prefill_latency_s": float(np.mean([t.ttft for t in ok])) if ok else 0.0,
        "decode_latency_s": float(np.mean(gaps)) if gaps else 0.0,
        "ttft_ms": distribution([t.ttft for t in ok]),
        "tpot_ms": distribution([t.tpot for t in ok if t.tpot is not None]),
        "itl_ms": distribution(gaps),
        "e2el_ms": distribution([t.e2e for t in ok]),
        "input_tokens_per_request": {"mean": float(np.mean(inputs)), "min": min(inputs), "max": max(inputs)},
    }
    if slos:
        good = [t for t in ok if all(SLO_FIGURES[k](t) is None or SLO_FIGURES[k](t) * 1e3 <= ms
                                     for k, ms in slos.items())]
        summary["goodput_requests_per_s"] = len(good) / wall
        summary["good_requests"] = len(good)
    return summary


def settings(args: argparse.Namespace, model: str, slos: dict[str, float]) -> dict[str, object]:
    return {
        "mode": "serve-bench", "base_url": args.base_url, "endpoint": args.endpoint, "model": model,
        "input_len": args.input_len, "output_len": args.output_len, "num_prompts": args.num_prompts,
        "mm_per_prompt": args.mm_per_prompt if args.endpoint == "chat" else 0,
        "input_vision_shape": args.input_vision_shape if args.endpoint == "chat" and args.mm_per_prompt else "",
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "max_concurrency": args.max_concurrency or "unbounded", "seed": args.seed,
        "goodput": " ".join(f"{k}:{v:g}" for k, v in slos.items()),
    }


def print_figures(args: argparse.Namespace, slos: dict[str, float], model: str, timings: list[Timing],
                  wall: float) -> tuple[dict, dict]:
    """Prints one run's figures; returns its summary and `***Perf Info***` (a UserError if every request failed)."""
    failed = [t for t in timings if not t.ok]
    for t in failed[:5]:
        print(f"failed request: {t.error}", file=sys.stderr)
    if len(failed) == len(timings):
        raise UserError(f"every request failed ({len(timings)}; the first reasons are above)")
    summary = summarize(timings, wall, args.output_len, slos)
    info = seed_perf_info(summary)
    print("***Perf Info***")
    print(json.dumps(info, indent=4))
    print(f"{'':26}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name, key in (("TTFT (ms)", "ttft_ms"), ("TPOT (ms)", "tpot_ms"), ("inter-token latency (ms)", "itl_ms"),
                      ("end-to-end latency (ms)", "e2el_ms")):
        d = summary[key]
        print(f"{name:26}{d['mean']:10.2f}{d['p50']:10.2f}{d['p90']:10.2f}{d['p99']:10.2f}")
    s, inputs = summary, summary["input_tokens_per_request"]
    print(f"requests: {s['requests']} answered, {s['failed']} failed, in {s['wall_seconds']:.2f} s; "
          f"{s['requests_per_s']:.2f} requests/s, {s['output_tokens_per_s']:.1f} output tokens/s, "
          f"{s['total_tokens_per_s']:.1f} tokens/s in all")
    print(f"prompt tokens per request (as the server counted them): mean {inputs['mean']:.1f}, min {inputs['min']}, "
          f"max {inputs['max']}" + (f"; goodput ({settings(args, model, slos)['goodput']}): "
                                   f"{s['goodput_requests_per_s']:.2f} requests/s ({s['good_requests']} of "
                                   f"{s['requests']})" if slos else ""))
    short = [t for t in timings if t.ok and t.output_tokens != args.output_len]
    if short:
        print(f"note: {len(short)} request(s) came back with other than {args.output_len} tokens (e.g. "
              f"{short[0].output_tokens}); the server must take vLLM's ignore_eos", file=sys.stderr)
    return summary, info


def request_records(timings: list[Timing]) -> list[dict]:
    return [{"ok": t.ok, "error": t.error, "ttft_ms": t.ttft * 1e3, "e2el_ms": t.e2e * 1e3,
             "tpot_ms": None if t.tpot is None else t.tpot * 1e3, "itl_ms": [g * 1e3 for g in t.itl],
             "prompt_tokens": t.prompt_tokens, "output_tokens": t.output_tokens} for t in timings]


def report(args: argparse.Namespace, slos: dict[str, float], model: str, timings: list[Timing], wall: float) -> None:
    summary, info = print_figures(args, slos, model, timings, wall)
    rows = {**settings(args, model, slos), **csv_figures(summary, info)}
    document = lambda: {  # noqa: E731
        "settings": settings(args, model, slos), "perf_info": info, "metrics": summary,
        "requests": request_records(timings),
        "environment": {"host": platform.node(), "cpu_model": cpu_model(), "packages": package_versions()},
    }
    save_reports(ReportSpec(args.save_result, args.result_dir, args.result_filename, args.output_json), rows, document)
