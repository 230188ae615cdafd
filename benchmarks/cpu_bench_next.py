"""LLaVA-NeXT on this CPU: the 1.26B LLaVA-shaped model of cpu_bench.py as a LLaVA-NeXT (same dimensions, the
v1.6 grid resolutions, random weights, bf16), ours against HF transformers in the same run, on one 672x672 image
(a base view and four tiles: 2,928 image positions) plus text; then the peak memory of one long prompt prefilled
whole and in chunks of 512 tokens (--max-num-batched-tokens), each in a process of its own (peak RSS).

    .venv/bin/python benchmarks/cpu_bench_next.py
"""
import json
import os
import subprocess
import sys
import time

from vllm_utils import LLM, SamplingParams  # before torch: the package sets libgomp's threads and wait before it loads

import torch
from vllm_utils.modes.backends import HFBackend
from vllm_utils.modes.synthetic import request_images, synthetic_requests

from cpu_bench import build_checkpoint

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
INPUT_LEN, DECODE_TOKENS, IMAGE = 3000, 16, (672, 672)


def next_twin(folder: str) -> str:
    """A config-only LLaVA-NeXT folder with the checkpoint's dimensions (run with random weights)."""
    twin = folder + "-llava-next"
    os.makedirs(twin, exist_ok=True)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config.update(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
                  image_grid_pinpoints=PINPOINTS)
    config["text_config"]["max_position_embeddings"] = 4096
    with open(os.path.join(twin, "config.json"), "w") as f:
        json.dump(config, f)
    return twin


def measure(llm, output_len: int) -> dict:
    processor = llm.processor if isinstance(llm, HFBackend) else llm.engine.processor
    images = request_images(processor, [], [IMAGE], 1)
    prompts = [r.as_prompt() for r in synthetic_requests(processor, INPUT_LEN, 1, images, seed=output_len)]
    start = time.perf_counter()
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True),
                       use_tqdm=False)[0]
    times = out.times.token_times
    return {"ttft": times[0] - out.times.arrival, "wall": time.perf_counter() - start,
            "tpot": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0}


def run_all(llm) -> dict:
    measure(llm, 2)  # warm-up
    ttft = min(measure(llm, 1)["ttft"] for _ in range(2))
    return {"ttft": ttft, "tpot": measure(llm, DECODE_TOKENS)["tpot"]}


def peak_rss_gib(folder: str, budget: int | None) -> float:
    """Peak RSS of a process that loads the model and prefills one long prompt (whole, or in chunks)."""
    code = f"""
import resource, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from cpu_bench_next import measure
from vllm_utils import LLM
llm = LLM({folder!r}, load_format="dummy", device="cpu", dtype="bfloat16", max_model_len=4096,
          max_num_batched_tokens={budget!r}, enable_prefix_caching=False)
measure(llm, 2)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(run.stdout.split()[-1])


def main() -> None:
    folder = next_twin(build_checkpoint())
    common = dict(load_format="dummy", device="cpu", dtype="bfloat16", max_model_len=4096, max_num_seqs=1)
    ours_llm = LLM(folder, enable_prefix_caching=False, **common)
    positions = sum(ours_llm.engine.processor.item_positions(
        ours_llm.engine.processor.image_inputs(request_images(ours_llm.engine.processor, [], [IMAGE], 1))))
    ours = run_all(ours_llm)
    del ours_llm
    hf = run_all(HFBackend.from_folder(folder, **common))
    whole, chunked = peak_rss_gib(folder, None), peak_rss_gib(folder, 512)
    print(f"\nLLaVA-NeXT-shaped 1.26B (random weights, bf16), torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads); one {IMAGE[0]}x{IMAGE[1]} image = {positions} positions, {INPUT_LEN}-token prompt\n")
    print("| figure | ours | HF transformers | speed, ours / HF |")
    print("|---|---|---|---|")
    print(f"| TTFT, s | {ours['ttft']:.2f} | {hf['ttft']:.2f} | {hf['ttft'] / ours['ttft']:.2f} |")
    print(f"| decode ms/token, batch 1 | {ours['tpot'] * 1e3:.0f} | {hf['tpot'] * 1e3:.0f} | "
          f"{hf['tpot'] / ours['tpot']:.2f} |")
    print(f"\n| ours, one {INPUT_LEN}-token prompt | peak RSS, GiB |\n|---|---|")
    print(f"| prefilled whole | {whole:.2f} |\n| prefilled in chunks of 512 | {chunked:.2f} |")


if __name__ == "__main__":
    main()
