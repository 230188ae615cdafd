"""Our engine against HF transformers on this CPU, on one LLaVA-shaped checkpoint built here: CLIP
ViT-L/14-336 tower + a 1.26B Llama (hidden 2048, 16 layers, 16 heads, intermediate 5632, vocab 32064),
random weights, bf16. One black 336x336 image + text = 600 prompt tokens, greedy, EOS ignored.
Prints a markdown table with ratios to HF and the memory-bandwidth floor measured here, then a Mistral-shaped
row: the same weights run as a Mistral decoder with a 512-token sliding window (shorter than the prompt),
against the Llama, interleaved.

    .venv/bin/python benchmarks/cpu_bench.py [--quick] [--no-mistral]
"""
import os
import platform
import sys
import time

from vllm_utils import LLM, SamplingParams  # before torch: the package sets libgomp's threads and wait before it loads

import torch
from vllm_utils.modes.backends import HFBackend
from vllm_utils.modes.synthetic import synthetic_requests
from vllm_utils.kernels import cpu as cpu_kernels
from vllm_utils.kernels.cpu_linear import PackedOneDnnLinear

import probes

CACHE = os.path.expanduser("~/.cache/vllm_utils/bench-llava-clip-l-llama-1.26b")
INPUT_LEN, DECODE_TOKENS = 600, 32


def build_checkpoint() -> str:
    if os.path.isfile(os.path.join(CACHE, "model.safetensors")):
        return CACHE
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from vllm_utils.testing.tiny_llava import LLAVA_CHAT_TEMPLATE, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer()
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
                       num_hidden_layers=16, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(CACHE)
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
                   tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE).save_pretrained(CACHE)
    return CACHE


def mistral_twin(folder: str, window: int = 512) -> str:
    """The checkpoint as a Mistral decoder with a sliding window (Mistral's weight names are Llama's): its own
    config.json beside links to the same weights and processor files."""
    import json

    twin = folder + f"-mistral-window{window}"
    os.makedirs(twin, exist_ok=True)
    for name in os.listdir(folder):
        if name != "config.json" and not os.path.exists(os.path.join(twin, name)):
            os.symlink(os.path.join(folder, name), os.path.join(twin, name))
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["text_config"].update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=window)
    with open(os.path.join(twin, "config.json"), "w") as f:
        json.dump(config, f)
    return twin


def language_model_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step must read: the decoder layers, final norm and LM head."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if name.startswith(("language_model.layers", "language_model.norm", "lm_head")))


def prefill_flops(model: torch.nn.Module, tokens: int) -> float:
    """FLOPs our engine does for one image prompt of `tokens` tokens (2 per multiply-add): the vision layers
    it runs and the projector, every decoder layer's products for every token except the last layer's output
    projection and MLP (last token only), causal attention, and the LM head for one token."""
    def matrix_params(module: torch.nn.Module) -> int:  # oneDNN-packed linears keep their weight elsewhere
        return sum(p.numel() for p in module.parameters() if p.dim() > 1) + sum(
            m.impl.packed.numel() for m in module.modules() if isinstance(getattr(m, "impl", None), PackedOneDnnLinear))

    vision, lm = model.vision_tower, model.language_model
    patches = vision.embeddings.num_positions - 1
    image_tokens = patches + 1
    width = vision.pre_layrnorm.normalized_shape[0]
    flops = 2 * matrix_params(vision.embeddings.patch_embedding) * patches
    for layer in vision.encoder.layers:
        flops += 2 * matrix_params(layer) * image_tokens + 4 * image_tokens**2 * width
    flops += 2 * matrix_params(model.multi_modal_projector) * model.num_image_features
    hidden = lm.norm.weight.numel()
    for i, layer in enumerate(lm.layers):
        last = i == len(lm.layers) - 1
        per_token = matrix_params(layer.self_attn.qkv_proj) if last else matrix_params(layer)
        flops += 2 * per_token * tokens + 2 * tokens * (tokens + 1) * hidden
        if last:
            flops += 2 * (matrix_params(layer.self_attn.o_proj) + matrix_params(layer.mlp))
    return flops + 2 * matrix_params(model.lm_head)


def memory_bandwidth() -> tuple[float, float, float]:
    """Bytes/s of a 1 GiB tensor copy (read + write), of a read-only pass (torch sum), and of the
    streaming read in our C kernels (on 2 MB pages), best of 5 each. Decode reads weights and writes almost
    nothing, so the fastest read is the floor."""
    a = torch.ones(1 << 28, dtype=torch.float32)
    b = torch.empty_like(a)
    copy = read = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        b.copy_(a)
        copy = min(copy, time.perf_counter() - start)
        start = time.perf_counter()
        a.sum()
        read = min(read, time.perf_counter() - start)
    stream = probes.read_bandwidth() if not cpu_kernels.unavailable_reason() else 0.0
    return 2 * a.numel() * 4 / copy, a.numel() * 4 / read, stream


def measure(llm, batch: int, output_len: int) -> dict:
    processor = llm.processor if isinstance(llm, HFBackend) else llm.engine.processor
    reqs = synthetic_requests(processor, INPUT_LEN, batch, None, seed=batch + output_len)
    prompts = [r.as_prompt() for r in reqs]
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True), use_tqdm=False)
    wall = time.perf_counter() - start
    ttft = sum(o.times.token_times[0] - o.times.arrival for o in outs) / batch
    tpot = [(o.times.token_times[-1] - o.times.token_times[0]) / (output_len - 1) for o in outs if output_len > 1]
    return {"ttft": ttft, "tpot": sum(tpot) / len(tpot) if tpot else 0.0, "tok_s": batch * output_len / wall}


def read_bandwidth_now() -> float:
    """The faster of our streaming read and torch `sum` over 1 GiB, best of 5 each, right now."""
    return max(memory_bandwidth()[1:])


def run_all(llm, batches: list[int]) -> dict:
    for _ in range(3):  # warm-up: the first few prefills run up to 50% slower (allocator, oneDNN kernel caches)
        measure(llm, 1, 2)
    ttfts = sorted(measure(llm, 1, 1)["ttft"] for _ in range(5))
    # This kind of VM's bandwidth moves with its neighbours (~35 or ~60 GB/s, minute to minute): the decode
    # floor uses the faster of the readings taken just before and just after the decode it is compared with.
    before = read_bandwidth_now()
    results = {"ttft": ttfts[2], "b1": measure(llm, 1, DECODE_TOKENS)["tpot"]}
    results["read_bandwidth"] = max(before, read_bandwidth_now())
    for b in batches:
        measure(llm, b, 2)  # warm-up at this batch's shapes: oneDNN builds kernels per shape on first use
        results[f"b{b}_tok_s"] = measure(llm, b, DECODE_TOKENS)["tok_s"]
    return results


def main() -> None:
    batches = [4] if "--quick" in sys.argv else [4, 16]
    folder = build_checkpoint()
    common = dict(device="cpu", dtype="bfloat16", max_model_len=1024, max_num_seqs=16)
    ours_llm = LLM(folder, enable_prefix_caching=False, **common)
    weight_bytes = language_model_bytes(ours_llm.engine.runner.model)
    flops = prefill_flops(ours_llm.engine.runner.model, INPUT_LEN)
    ours = run_all(ours_llm, batches)
    del ours_llm
    hf = run_all(HFBackend.from_folder(folder, **common), batches)
    copy_bandwidth, sum_bandwidth, stream_bandwidth = memory_bandwidth()
    read_bandwidth = ours["read_bandwidth"]
    floor = weight_bytes / read_bandwidth
    peak = probes.peak_bf16_flops() if not cpu_kernels.unavailable_reason() else 0.0
    ttft_floor = flops / peak if peak else 0.0
    print(f"\nCPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); CPU kernels: {cpu_kernels.unavailable_reason() or 'on'}; bandwidth: "
          f"read {stream_bandwidth / 1e9:.1f} GB/s (our streaming read), {sum_bandwidth / 1e9:.1f} GB/s (torch sum), "
          f"copy {copy_bandwidth / 1e9:.1f} GB/s (read + write) at the end; around our decode, read "
          f"{read_bandwidth / 1e9:.1f} GB/s: decode floor {weight_bytes / 1e9:.2f} GB / "
          f"{read_bandwidth / 1e9:.1f} GB/s = {floor * 1e3:.0f} ms/token; bf16 peak {peak / 1e9:.0f} GFLOP/s (dot-product "
          f"loop), prefill floor {flops / 1e12:.2f} TFLOP / peak = {ttft_floor:.2f} s\n")
    print("| figure | ours | HF transformers | speed, ours / HF | ours / floor |")
    print("|---|---|---|---|---|")
    ttft_ratio = f"{ours['ttft'] / ttft_floor:.2f}" if ttft_floor else ""
    print(f"| TTFT, s (600-token image prompt, median of 5) | {ours['ttft']:.2f} | {hf['ttft']:.2f} | "
          f"{hf['ttft'] / ours['ttft']:.2f} | {ttft_ratio} |")
    print(f"| decode ms/token, batch 1 | {ours['b1'] * 1e3:.0f} | {hf['b1'] * 1e3:.0f} | {hf['b1'] / ours['b1']:.2f} "
          f"| {ours['b1'] / floor:.2f} |")
    for b in batches:
        key = f"b{b}_tok_s"
        print(f"| output tokens/s, batch {b} (600 in, 32 out) | {ours[key]:.1f} | {hf[key]:.1f} | {ours[key] / hf[key]:.2f} | |")
    if "--no-mistral" not in sys.argv:
        compare_mistral(folder, common)


def compare_mistral(folder: str, common: dict, rounds: int = 2) -> None:
    """Ours as Llama and as Mistral with a sliding window, the same weights, measured in turns."""
    figures = {"llama": [], "mistral": []}
    for _ in range(rounds):
        for name, path in (("llama", folder), ("mistral", mistral_twin(folder))):
            llm = LLM(path, enable_prefix_caching=False, **common)
            for _ in range(2):
                measure(llm, 1, 2)
            ttft = sorted(measure(llm, 1, 1)["ttft"] for _ in range(3))[1]
            figures[name].append((ttft, measure(llm, 1, DECODE_TOKENS)["tpot"]))
            del llm
    (llama_ttft, llama_tpot), (mistral_ttft, mistral_tpot) = (
        (min(t for t, _ in figures[n]), min(d for _, d in figures[n])) for n in ("llama", "mistral"))
    print("\n| ours, same weights | TTFT, s (600-token image prompt) | decode ms/token, batch 1 |")
    print("|---|---|---|")
    print(f"| Llama decoder | {llama_ttft:.2f} | {llama_tpot * 1e3:.0f} |")
    print(f"| Mistral decoder, sliding window 512 | {mistral_ttft:.2f} | {mistral_tpot * 1e3:.0f} |")
    print(f"| Mistral / Llama | {mistral_ttft / llama_ttft:.2f} | {mistral_tpot / llama_tpot:.2f} |")


if __name__ == "__main__":
    main()
