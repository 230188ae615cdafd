"""LLaVA-1.5-7B (bundled config, random weights, bf16) on one CUDA GPU: our engine in graph and eager
mode against HF transformers, and against the device's measured limits. Prints a markdown table.

    PYTHONPATH=. python3 benchmarks/gpu_bench.py
"""
import gc
import time

import torch

from vllm_utils import LLM, SamplingParams
from vllm_utils.modes.synthetic import synthetic_requests

MODEL = "llava-hf/llava-1.5-7b-hf"


def measured_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (bytes read + written)."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (start.elapsed_time(end) / 1e3)


def measured_bf16_flops() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (time.perf_counter() - start)


def run(llm: LLM, batch: int, input_len: int, output_len: int) -> dict:
    reqs = synthetic_requests(llm.engine.processor, input_len, batch, None, seed=batch)
    prompts = [r.as_prompt() for r in reqs]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    ttft = sum(o.times.token_times[0] - o.times.arrival for o in outs) / len(outs)
    tpot = sum((o.times.token_times[-1] - o.times.token_times[0]) / max(1, output_len - 1) for o in outs) / len(outs)
    return {"ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3, "tok_s": batch * output_len / wall}


def ours(enforce_eager: bool, full: bool = True, triton_gemv: bool = False) -> dict:
    """`full=False`: decode at batch 1 and the graph replay only (for a lever's A/B)."""
    llm = LLM(MODEL, load_format="dummy", device="cuda", dtype="bfloat16", max_model_len=4096, block_size=16,
              max_num_seqs=128, enforce_eager=enforce_eager, triton_gemv=triton_gemv,
              enable_prefix_caching=False)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in llm.engine.runner.model.named_parameters()
                       if not n.startswith(("vision_tower", "multi_modal_projector", "language_model.embed_tokens")))
    result = {"weight_bytes": weight_bytes, "b1": run(llm, 1, 600, 128)}
    if full:
        ttfts = sorted(run(llm, 1, 600, 1)["ttft_ms"] for _ in range(7))
        result |= {"ttft": {"ttft_ms": ttfts[len(ttfts) // 2]}, "b32": run(llm, 32, 600, 128),
                   "b128": run(llm, 128, 600, 128)}
    graphs = llm.engine.runner.graphs
    if graphs is not None:  # GPU time of one decode step alone: the batch-1 graph replayed back to back
        graph = graphs.graphs[1][0]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        result["replay_ms"] = start.elapsed_time(end) / 50
        del graph
    del graphs, llm
    gc.collect()
    torch.cuda.empty_cache()
    return result


def hf_decode_batch1() -> dict:
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from vllm_utils.config import bundled_config_dir

    config = AutoConfig.from_pretrained(bundled_config_dir(MODEL))
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 32000, (1, 600), device="cuda")
    ids[0, 2:578] = config.image_token_index
    pixels = torch.zeros(1, 3, 336, 336, dtype=torch.bfloat16, device="cuda")
    result = {}
    for new_tokens in (1, 128, 1, 1, 1, 1, 128):  # the last of each is kept: warm
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False)
        torch.cuda.synchronize()
        result[new_tokens] = time.perf_counter() - start if new_tokens == 128 else \
            min(result.get(1, 1e9), time.perf_counter() - start)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"ttft_ms": result[1] * 1e3, "tpot_ms": (result[128] - result[1]) / 127 * 1e3}


def main() -> None:
    bandwidth, flops = measured_bandwidth(), measured_bf16_flops()
    graph, eager, hf = ours(False), ours(True), hf_decode_batch1()
    graph_gemv = ours(False, full=False, triton_gemv=True)  # the lever under test: single-row linears in Triton
    floor_ms = graph["weight_bytes"] / bandwidth * 1e3
    print(f"\nGPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; measured copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    print(f"decode floor at batch 1: {graph['weight_bytes'] / 1e9:.2f} GB of weights / bandwidth = {floor_ms:.2f} ms/token\n")
    print("| figure | ours, graph | ours, eager | HF transformers | graph vs floor | graph vs HF |")
    print("|---|---|---|---|---|---|")
    print(f"| decode ms/token, batch 1 (600-token prompt) | {graph['b1']['tpot_ms']:.2f} | {eager['b1']['tpot_ms']:.2f} | "
          f"{hf['tpot_ms']:.2f} | {graph['b1']['tpot_ms'] / floor_ms:.2f}x floor | {hf['tpot_ms'] / graph['b1']['tpot_ms']:.1f}x faster |")
    print(f"| TTFT ms, 600-token image prompt | {graph['ttft']['ttft_ms']:.1f} | {eager['ttft']['ttft_ms']:.1f} | "
          f"{hf['ttft_ms']:.1f} | | {hf['ttft_ms'] / graph['ttft']['ttft_ms']:.1f}x faster |")
    print(f"| decode step GPU time alone (batch-1 graph replayed back to back) | {graph['replay_ms']:.2f} | | | "
          f"{graph['replay_ms'] / floor_ms:.2f}x floor | |")
    print(f"| decode ms/token, batch 1 / graph replay alone, with VLLM_UTILS_TRITON_GEMV=1 | {graph_gemv['b1']['tpot_ms']:.2f} / "
          f"{graph_gemv['replay_ms']:.2f} | | | {graph_gemv['replay_ms'] / floor_ms:.2f}x floor | |")
    for key, name in (("b32", "batch 32"), ("b128", "batch 128")):
        print(f"| output tokens/s, {name} (600 in, 128 out) | {graph[key]['tok_s']:.0f} | {eager[key]['tok_s']:.0f} | | | |")


if __name__ == "__main__":
    main()
