"""Prefix caching on an `--acc`-shaped workload: several questions on each picture, in one batch, as `--acc` asks
them (each sample's prompt built by its `prepare`), on cpu_bench.py's LLaVA-shaped checkpoint (CLIP ViT-L/14-336 +
a 1.26B Llama, bf16, random weights). One engine with the cache and one without, in turns (the cache forgotten
before each of its rounds); the replies must be identical. Prints the wall time of each round, the medians'
ratio, and the share of prompt tokens the cache held.

    .venv/bin/python benchmarks/cpu_prefix_cache.py [--images 4] [--questions 4] [--rounds 3] [--output-len 16]
"""
import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date

from vllm_utils import LLM, SamplingParams  # before torch: the package sets libgomp's threads and wait before it loads

import torch
from PIL import Image

from vllm_utils.modes.acc.run import prepare
from vllm_utils.modes.acc.sample import Sample
from vllm_utils.testing.images import make_demo_image

from cpu_bench import build_checkpoint

SHARED_IMAGES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "assets", "images")
QUESTIONS = ["What is the main object in the picture?", "What colour is the background?",
             "How many people can you see? Answer with a number.", "Is there any text in the image? Answer yes or no.",
             "Where might this picture have been taken?", "What is the weather like in the picture?"]


def pictures(count: int, folder: str) -> list[str]:
    """`count` picture files: ../shared's photos where present, else generated ones."""
    if os.path.isdir(SHARED_IMAGES):
        names = sorted(n for n in os.listdir(SHARED_IMAGES) if n.endswith((".png", ".jpg")))
        if len(names) >= count:
            return [os.path.join(SHARED_IMAGES, n) for n in names[:count]]
    os.makedirs(folder, exist_ok=True)
    return [make_demo_image(os.path.join(folder, f"{i}.png"), seed=i) for i in range(count)]


def samples(images: list[str], questions: int) -> list[Sample]:
    """Each picture with `questions` short-answer questions (VQA's instruction), picture by picture."""
    rows = []
    for i, path in enumerate(images):
        for j, question in enumerate(QUESTIONS[:questions]):
            rows.append(Sample(id=f"{i}-{j}", row=len(rows), text=f"{question}\nAnswer the question using a single "
                               f"word or phrase.", images=[os.path.basename(path)], references=["-"], metric="vqa",
                               base_dir=os.path.dirname(path)))
    return rows


def timed(llm: LLM, requests: list[dict], params: SamplingParams) -> tuple[float, list[list[int]]]:
    llm.reset_prefix_cache()
    llm.engine.reset_stats()
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    return time.perf_counter() - start, [o.outputs[0].token_ids for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--questions", type=int, default=4, help=f"per picture, at most {len(QUESTIONS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-len", type=int, default=16, help="tokens per reply (--acc's VQA length)")
    args = parser.parse_args()
    folder = build_checkpoint()
    # a KV cache for the batch (1,024 tokens a request), not the default budget: two engines share the RAM
    common = dict(device="cpu", dtype="bfloat16", max_model_len=1024,
                  num_kv_blocks=args.images * args.questions * 1024 // 16)
    engines = {"with the cache": LLM(folder, enable_prefix_caching=True, **common),
               "without": LLM(folder, enable_prefix_caching=False, **common)}
    processor = engines["without"].engine.processor
    requests = [prepare(s, processor, 1024)[1] for s in samples(pictures(args.images, "/tmp/prefix-bench"),
                                                               args.questions)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len)
    for llm in engines.values():  # warm-up: allocator growth, oneDNN's kernels for these shapes
        timed(llm, requests[:2], SamplingParams(temperature=0, max_tokens=2))
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    replies: dict[str, list[list[int]]] = {}
    for r in range(args.rounds):
        for name, llm in engines.items():
            wall, replies[name] = timed(llm, requests, params)
            seconds[name].append(wall)
            print(f"round {r + 1}, {name}: {wall:.2f} s", flush=True)
    same = replies["with the cache"] == replies["without"]
    stats = engines["with the cache"].engine.stats
    with_cache, without = (statistics.median(seconds[name]) for name in engines)
    print(f"\n{date.today()}, CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads); {len(requests)} requests ({args.images} pictures x "
          f"{args.questions} questions, {len(requests[0]['prompt_token_ids'])}-{max(len(q['prompt_token_ids']) for q in requests)} "
          f"prompt tokens, {args.output_len} out), one batch, {args.rounds} rounds in turns\n")
    print("| engine | wall s, median | rounds | prompt tokens from the cache | replies |")
    print("|---|---|---|---|---|")
    print(f"| without the cache | {without:.2f} | {', '.join(f'{s:.2f}' for s in seconds['without'])} | 0 | |")
    print(f"| with the cache | {with_cache:.2f} | {', '.join(f'{s:.2f}' for s in seconds['with the cache'])} | "
          f"{stats.prefix_cache_hit_rate:.1%} | {'identical' if same else 'DIFFERENT'} |")
    print(f"\nspeed-up, without / with: {without / with_cache:.2f}x")
    if not same:
        sys.exit("the replies differ with and without the cache")


if __name__ == "__main__":
    main()
