"""Prefix caching on an `--acc`-shaped workload: several questions on each picture, in one batch, as `--acc` asks
them (each sample's prompt built by its `prepare`), on cpu_bench.py's LLaVA-shaped checkpoint (CLIP ViT-L/14-336 +
a 1.26B Llama, bf16, random weights). One engine with the cache and one without, in turns (the cache forgotten
before each of its rounds); the replies must be identical. Prints the wall time of each round, the medians'
ratio, the share of prompt tokens the cache held, and how many replies are identical. In bfloat16 a request that
starts after cached blocks computes its few new rows with other kernels than a whole prompt's (the C decode kernels
up to 4 rows, its attention over the cache in PyTorch), so a reply may part from the uncached one where two tokens
are near-tied; in float32 (`--dtype float32`) every reply must be identical.

    .venv/bin/python benchmarks/cpu_prefix_cache.py [--images 4] [--questions 4] [--rounds 3] [--output-len 16] \
        [--dtype bfloat16]
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

from vllm_utils.modes.acc.run import prepare
from vllm_utils.modes.acc.sample import Sample
from vllm_utils.testing.images import make_demo_image

from cpu_bench import build_checkpoint

MAX_LEN = 704  # a 576-position picture, a question and the reply
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
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    folder = build_checkpoint()
    # a KV cache for the batch (MAX_LEN tokens a request), not the default budget: two engines share the RAM
    common = dict(device="cpu", dtype=args.dtype, max_model_len=MAX_LEN,
                  num_kv_blocks=args.images * args.questions * MAX_LEN // 16)
    engines = {"with the cache": LLM(folder, enable_prefix_caching=True, **common),
               "without": LLM(folder, enable_prefix_caching=False, **common)}
    processor = engines["without"].engine.processor
    requests = [prepare(s, processor, MAX_LEN)[1] for s in samples(pictures(args.images, "/tmp/prefix-bench"),
                                                               args.questions)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len)
    for llm in engines.values():  # warm-up: allocator growth, oneDNN's kernels for these shapes
        timed(llm, requests[:2], SamplingParams(temperature=0, max_tokens=2))
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    split: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}  # (prefill s, decode s) per round
    replies: dict[str, list[list[int]]] = {}
    for r in range(args.rounds):
        for name, llm in engines.items():
            wall, replies[name] = timed(llm, requests, params)
            seconds[name].append(wall)
            split[name].append((llm.engine.stats.prefill_seconds, llm.engine.stats.decode_seconds))
            print(f"round {r + 1}, {name}: {wall:.2f} s (prefill steps {split[name][-1][0]:.2f} s, decode steps "
                  f"{split[name][-1][1]:.2f} s)", flush=True)
    pairs = list(zip(replies["with the cache"], replies["without"]))
    same = sum(a == b for a, b in pairs)
    parted = [next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) for a, b in pairs if a != b]
    stats = engines["with the cache"].engine.stats
    with_cache, without = (statistics.median(seconds[name]) for name in engines)
    print(f"\n{date.today()}, CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads); {len(requests)} requests ({args.images} pictures x "
          f"{args.questions} questions, {args.dtype}, {len(requests[0]['prompt_token_ids'])}-{max(len(q['prompt_token_ids']) for q in requests)} "
          f"prompt tokens, {args.output_len} out), one batch, {args.rounds} rounds in turns\n")
    print("| engine | wall s, median | rounds | prompt tokens from the cache | replies |")
    print("|---|---|---|---|---|")
    print(f"| without the cache | {without:.2f} | {', '.join(f'{s:.2f}' for s in seconds['without'])} | 0 | |")
    print(f"| with the cache | {with_cache:.2f} | {', '.join(f'{s:.2f}' for s in seconds['with the cache'])} | "
          f"{stats.prefix_cache_hit_rate:.1%} | {same} of {len(pairs)} identical |")
    print(f"\nspeed-up, without / with: {without / with_cache:.2f}x")
    if parted:
        print(f"the other replies part from the uncached ones at output token {', '.join(map(str, parted))}")
    if args.dtype == "float32" and parted:
        sys.exit("in float32 every reply must be the one without the cache")


if __name__ == "__main__":
    main()
