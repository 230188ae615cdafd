"""The sampler's time per step: ours, ours at an earlier revision (loaded from git), and HF transformers' sampling
(its warpers, softmax and torch.multinomial, as `generate` runs them), interleaved in one process, on random logits
of LLaVA's and Qwen2-VL's vocabulary sizes. The ceiling it is held to is the decode step it belongs to: the
1.26B benchmark's ~40 ms per token on this 2-core CPU.

    .venv/bin/python benchmarks/sampler_bench.py [--before REV] [--reps 30]
"""
import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import inspect
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from vllm_utils.layers import sampler
from vllm_utils.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "greedy, with log-probs": dict(temperature=0.0, logprobs=0),
    "temperature 0.8": dict(temperature=0.8),
    "temperature 0.8, seeded": dict(temperature=0.8, seed=0),
    "top-k 50": dict(top_k=50),
    "top-p 0.9": dict(top_p=0.9),
    "top-k 50, top-p 0.9": dict(top_k=50, top_p=0.9),
}


def sampler_at(revision: str):
    """The sampler module as it was at `revision`."""
    source = subprocess.run(["git", "show", f"{revision}:vllm_utils/layers/sampler.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "sampler_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("sampler_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hf_sample(logits: torch.Tensor, p: SamplingParams) -> list[int]:
    if p.greedy:
        tokens = logits.argmax(dim=-1)
        logits.float().log_softmax(dim=-1).gather(-1, tokens[:, None])  # generate's output_scores
        return tokens.tolist()
    scores = TemperatureLogitsWarper(p.temperature)(None, logits.float())
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(None, scores)
    if p.top_p < 1:
        scores = TopPLogitsWarper(p.top_p)(None, scores)
    return torch.multinomial(scores.softmax(dim=-1), 1).squeeze(-1).tolist()


def ours(module) -> Callable[[torch.Tensor, SamplingParams], list[int]]:
    def run(logits: torch.Tensor, p: SamplingParams) -> list[int]:
        generators = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None] * len(logits)
        if "histories" in inspect.signature(module.sample).parameters:  # since the penalties: logprobs in the params
            return module.sample(logits, [p] * len(logits), generators)[0]
        return module.sample(logits, [p] * len(logits), generators, p.logprobs is not None)[0]
    return run


def median_ms(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=None, help="a git revision to compare with (e.g. HEAD~1)")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    sides = {"ours": ours(sampler)}
    if args.before:
        sides[f"ours at {args.before}"] = ours(sampler_at(args.before))
    sides["HF"] = hf_sample
    print(f"{time.strftime('%Y-%m-%d')}; torch {torch.__version__}, {torch.get_num_threads()} threads; bf16 logits "
          f"(random normal x 6: a peaked distribution, as a model's); median of {args.reps} steps, sides interleaved\n")
    print("| vocabulary, batch | case | " + " | ".join(f"{s}, ms" for s in sides) + " | HF / ours |")
    print("|---|---|" + "---|" * (len(sides) + 1))
    for vocab in (32064, 151936):
        for batch in (1, 16):
            logits = (torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0)) * 6).bfloat16()
            for name, fields in CASES.items():
                p = SamplingParams(**fields)
                times = {s: [] for s in sides}
                for _ in range(3):
                    for s, fn in sides.items():
                        times[s].append(median_ms(lambda: fn(logits, p), max(1, args.reps // 3)))
                figures = {s: statistics.median(t) for s, t in times.items()}
                cells = " | ".join(f"{figures[s]:.3f}" for s in sides)
                print(f"| {vocab}, {batch} | {name} | {cells} | {figures['HF'] / figures['ours']:.1f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
