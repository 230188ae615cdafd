"""Perf figures from per-request timestamps and the engine's step statistics."""
from dataclasses import dataclass

import numpy as np

from vllm_utils.engine.llm_engine import EngineStats
from vllm_utils.outputs import RequestOutput


@dataclass
class TimedRun:
    wall_seconds: float
    outputs: list[RequestOutput]
    stats: EngineStats


def distribution(values: list[float], unit_scale: float = 1e3) -> dict[str, float]:
    """mean / p50 / p90 / p99 in milliseconds (empty -> zeros)."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    a = np.asarray(values) * unit_scale
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def summarize(runs: list[TimedRun], output_len: int) -> dict:
    """Raw numbers (seconds, counts) over all timed runs; averages per run where the seed's keys ask for one."""
    wall = float(np.mean([r.wall_seconds for r in runs]))
    outputs = [o for r in runs for o in r.outputs]
    ttft = [o.times.token_times[0] - o.times.arrival for o in outputs]
    to_first = [o.times.token_times[0] - o.times.first_scheduled for o in outputs]
    gaps = [float(g) for o in outputs for g in np.diff(o.times.token_times)]
    tpot = [(o.times.token_times[-1] - o.times.token_times[0]) / (len(o.times.token_times) - 1)
            for o in outputs if len(o.times.token_times) > 1]
    requests = len(runs[0].outputs)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in runs[0].outputs)
    prefill_s = sum(r.stats.prefill_seconds for r in runs)
    decode_s = sum(r.stats.decode_seconds for r in runs)
    return {
        "wall_seconds": wall,
        "requests": requests,
        "output_tokens": out_tokens,
        "latency_per_token_s": wall / output_len,
        "requests_per_s": requests / wall,
        "output_tokens_per_s": out_tokens / wall,
        "prefill_latency_s": float(np.mean(to_first)),
        "decode_latency_s": float(np.mean(gaps)) if gaps else 0.0,
        "ttft_ms": distribution(ttft),
        "tpot_ms": distribution(tpot),
        "itl_ms": distribution(gaps),
        "prefill_tokens_per_second": sum(r.stats.prefill_tokens for r in runs) / prefill_s if prefill_s else 0.0,
        "decode_tokens_per_second": sum(r.stats.decode_tokens for r in runs) / decode_s if decode_s else 0.0,
        "preemptions": sum(o.num_preemptions for o in outputs),
        "peak_kv_blocks_used": max(r.stats.peak_blocks_used for r in runs),
        "prefix_cache_hit_rate": _hit_rate([r.stats for r in runs]),
    }


def _hit_rate(stats: list[EngineStats]) -> float | None:
    """The share of admitted prompt tokens found in the prefix cache (None: no cache looked up)."""
    queries = sum(s.prefix_cache_queries for s in stats)
    return sum(s.prefix_cache_hits for s in stats) / queries if queries else None


def seed_perf_info(summary: dict) -> dict[str, str]:
    """The seed's `***Perf Info***` keys, values with units as the seed prints them."""
    return {
        "latency_num_prompts": f"{summary['wall_seconds'] * 1e3:.2f} ms",
        "latency_per_token": f"{summary['latency_per_token_s'] * 1e3:.2f} ms",
        "request_per_second": f"{summary['requests_per_s']:.4f} requests/s",
        "token_per_second": f"{summary['output_tokens_per_s']:.2f} tokens/s",
        "prefill_latency_per_token": f"{summary['prefill_latency_s'] * 1e3:.2f} ms",
        "decode_latency_per_token": f"{summary['decode_latency_s'] * 1e3:.2f} ms",
    }
