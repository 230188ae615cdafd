"""Qwen2.5-VL on this CPU: the bundled Qwen2.5-VL-3B-Instruct configuration (3.75B parameters: a 32-block
windowed vision transformer and a 36-layer Qwen2 decoder), random weights, bf16, ours against HF transformers in
the same run. One black 448x448 image (1,024 patches, 256 positions) plus text = 600 prompt tokens, greedy, EOS
ignored. Prints a markdown table with ratios to HF and to the floors measured here (weight bytes / read bandwidth
for decode, FLOPs / bf16 peak for the prefill).

    .venv/bin/python benchmarks/cpu_bench_qwen.py
"""
import os
import platform

import torch

from vllm_utils import LLM, SamplingParams
from vllm_utils.modes.backends import HFBackend
from vllm_utils.modes.synthetic import request_images, synthetic_requests
from vllm_utils.kernels import cpu as cpu_kernels

import probes
from cpu_bench import read_bandwidth_now

MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
INPUT_LEN, DECODE_TOKENS, IMAGE = 600, 16, (448, 448)


def measure(llm, output_len: int) -> dict:
    processor = llm.processor if isinstance(llm, HFBackend) else llm.engine.processor
    images = request_images(processor, [], [IMAGE], 1)
    prompts = [r.as_prompt() for r in synthetic_requests(processor, INPUT_LEN, 1, images, seed=output_len)]
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True),
                       use_tqdm=False)[0]
    times = out.times.token_times
    return {"ttft": times[0] - out.times.arrival,
            "tpot": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0}


def run_all(llm) -> dict:
    measure(llm, 2)  # warm-up: allocator growth, oneDNN's kernels for these shapes
    ttft = sorted(measure(llm, 1)["ttft"] for _ in range(3))[1]
    before = read_bandwidth_now()
    tpot = measure(llm, DECODE_TOKENS)["tpot"]
    return {"ttft": ttft, "tpot": tpot, "read_bandwidth": max(before, read_bandwidth_now())}


def decode_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: the decoder's layers, its final norm and the LM head (tied: the embeddings)."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters(remove_duplicate=False)
               if name.startswith(("language_model.layers", "language_model.norm", "lm_head")))


def prefill_flops(config, patches: int, windows: int, tokens: int) -> float:
    """FLOPs of one image prompt (2 per multiply-add), from the checkpoint's config (not our modules, whose packed
    weights are held elsewhere): the patch embedding, every vision block's products for every patch and its
    attention within windows of `windows` patches (full-attention blocks: all patches), the merger, every decoder
    layer's products and causal attention for every token (the last layer's output projection and MLP for the
    last token only, as the next token needs no more), and the LM head for one token."""
    vision, text = config.vision_config, config.text_config
    width, unit = vision.hidden_size, vision.spatial_merge_size**2
    patch = 3 * vision.temporal_patch_size * vision.patch_size**2
    block = 4 * width * width + 3 * width * vision.intermediate_size  # qkv, proj; gate, up, down
    flops = 2 * patch * width * patches
    for i in range(vision.depth):
        span = patches if i in vision.fullatt_block_indexes else windows
        flops += 2 * block * patches + 4 * patches * span * width
    merged = width * unit
    flops += 2 * (merged * merged + merged * vision.out_hidden_size) * patches // unit
    hidden, head = text.hidden_size, text.hidden_size // text.num_attention_heads
    qkv = hidden * head * (text.num_attention_heads + 2 * text.num_key_value_heads)
    rest = hidden * hidden + 3 * hidden * text.intermediate_size  # o_proj; gate, up, down
    for i in range(text.num_hidden_layers):
        last = i == text.num_hidden_layers - 1
        flops += 2 * qkv * tokens + 2 * rest * (1 if last else tokens) + 2 * tokens * (tokens + 1) * hidden
    return flops + 2 * hidden * text.vocab_size


def main() -> None:
    common = dict(load_format="dummy", device="cpu", dtype="bfloat16", max_model_len=2048, max_num_seqs=1)
    ours_llm = LLM(MODEL, enable_prefix_caching=False, **common)
    model = ours_llm.engine.runner.model
    weight_bytes = decode_bytes(model)
    config = ours_llm.engine.config.hf_config
    side, window = IMAGE[0] // 14, config.vision_config.window_size // config.vision_config.patch_size
    flops = prefill_flops(config, side * side, min(side, window) ** 2, INPUT_LEN)
    ours = run_all(ours_llm)
    del ours_llm, model
    hf = run_all(HFBackend.from_folder(MODEL, **common))
    peak = probes.peak_bf16_flops() if not cpu_kernels.unavailable_reason() else 0.0
    read = ours["read_bandwidth"]
    floor, ttft_floor = weight_bytes / read, flops / peak if peak else 0.0
    print(f"\nQwen2.5-VL-3B-shaped (random weights, bf16); CPU: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); one "
          f"{IMAGE[0]}x{IMAGE[1]} image = 256 positions in a {INPUT_LEN}-token prompt; decode floor "
          f"{weight_bytes / 1e9:.2f} GB / {read / 1e9:.1f} GB/s = {floor * 1e3:.0f} ms/token; prefill floor "
          f"{flops / 1e12:.2f} TFLOP / {peak / 1e9:.0f} GFLOP/s = {ttft_floor:.2f} s\n")
    print("| figure | ours | HF transformers | speed, ours / HF | ours / floor |")
    print("|---|---|---|---|---|")
    ttft_ratio = f"{ours['ttft'] / ttft_floor:.2f}" if ttft_floor else ""
    print(f"| TTFT, s (median of 3) | {ours['ttft']:.2f} | {hf['ttft']:.2f} | {hf['ttft'] / ours['ttft']:.2f} | "
          f"{ttft_ratio} |")
    print(f"| decode ms/token, batch 1 | {ours['tpot'] * 1e3:.0f} | {hf['tpot'] * 1e3:.0f} | "
          f"{hf['tpot'] / ours['tpot']:.2f} | {ours['tpot'] / floor:.2f} |")


if __name__ == "__main__":
    main()
