"""Qwen3-VL decoders on this CPU: ours against HF transformers, interleaved in one process, and against the decode
floor measured in the same run (the bytes one decode step reads / the read bandwidth read just before and after).

Two shapes, config-only folders run with random weights (`load_format="dummy"`) on both sides, bf16:

- dense (`qwen3_vl`): Qwen3-VL-2B-Instruct's text decoder at its full depth (Qwen3-1.7B's dimensions: hidden 2048,
  28 layers of 16 query heads of 128 and 8 key/value heads, MLP 6144, tied embeddings, 151936-token vocabulary)
  and its vision tower (24 blocks of width 1024, MLP 4096, DeepStack from blocks 5, 11, 17), over the bundled
  Qwen3-VL-8B-Instruct config (RoPE, token ids).
- MoE (`qwen3_vl_moe`): the bundled Qwen3-VL-30B-A3B-Instruct config (hidden 2048, 32 query heads of 128 and 4
  key/value heads, 128 experts of width 768, 8 chosen per token, every layer sparse, untied LM head,
  151936-token vocabulary, the 27-block vision tower) with 4 of its 48 decoder layers (--moe-layers; 3 at
  least, for DeepStack): each layer's experts are 1.2 GB, and ours and HF's copies must fit this 24 GB VM
  together. With 4 layers the LM head is ~58% of the bytes a decode step reads (~10% in the 48-layer model).

The request: one black 256x256 image (64 positions) in a 160-token prompt, greedy, EOS ignored; at batch 4, four
such prompts of different text. Per round and batch, ours then HF decode 17 tokens; the floor uses the read
bandwidth measured around our decode (`cpu_bench.read_bandwidth_now`). A decode step's bytes (counted on HF's
model): the decoder layers' weights (MoE: router, attention and norms, and only the experts the step's tokens
chose, counted on our layers: 8 of 128 at batch 1), the final norm and the LM head; the embedding rows read are
negligible. Before each measurement the script waits for other processes to leave the CPU (--patience), and
measures again (up to 3 times) when they took 0.2 cores or more meanwhile; the table says how much they took.

    cd benchmarks && ../.venv/bin/python cpu_bench_qwen3_vl.py [--rounds 3] [--moe-layers 4] [--profile]
"""
import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import time

from vllm_utils import LLM, SamplingParams  # before torch: the package sets libgomp's threads and wait before it loads

import torch
import transformers
from vllm_utils.bundled import HERE as BUNDLED_ROOT
from vllm_utils.layers.moe import FusedMoE
from vllm_utils.modes.backends import HFBackend
from vllm_utils.modes.synthetic import request_images, synthetic_requests

from cpu_bench import read_bandwidth_now
from quiet import machine_busy_seconds, process_seconds

CACHE = os.path.expanduser("~/.cache/vllm_utils")
INPUT_LEN, DECODE_TOKENS, IMAGE, BATCHES, RETRIES = 160, 17, (256, 256), (1, 4), 3

DENSE_TEXT = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
DENSE_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                    deepstack_visual_indexes=[5, 11, 17])


def config_folder(name: str, bundled: str, text: dict, vision: dict, **top) -> str:
    """A config-only folder: a bundled config with `text`, `vision` and `top` values over it."""
    with open(os.path.join(BUNDLED_ROOT, bundled, "config.json")) as f:
        config = json.load(f)
    config.update(top)
    config["text_config"].update(text)
    config["vision_config"].update(vision)
    folder = os.path.join(CACHE, f"bench-{name}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return folder


def decode_bytes(hf_model: torch.nn.Module, experts_read: float) -> float:
    """Bytes one decode step reads, counted on HF's model (ours repacks some weights): the decoder layers but their
    experts, the final norm and the LM head (tied: the embeddings), plus `experts_read` experts' weights in
    every sparse layer."""
    total, expert_bytes = 0.0, 0.0
    for name, p in hf_model.named_parameters(remove_duplicate=False):
        if not name.startswith(("model.language_model.layers", "model.language_model.norm", "lm_head")):
            continue
        if ".experts." in name:
            expert_bytes += p.numel() * p.element_size() / p.shape[0]  # one expert of one layer
        else:
            total += p.numel() * p.element_size()
    return total + expert_bytes * experts_read


class ExpertCounter:
    """The distinct experts each of our MoE layers runs in each decode step (a hook on every FusedMoE; forwards
    of more rows than the largest batch are prefills, not counted)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.counts: list[int] = []
        self.layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
        for m in self.layers:
            m.register_forward_pre_hook(self.hook)

    def hook(self, _module, args) -> None:
        x, _weights, ids = args
        if x.shape[0] <= max(BATCHES):
            self.counts.append(int(ids.unique().numel()))

    def mean_since(self, start: int) -> float:
        counts = self.counts[start:]
        return sum(counts) / len(counts) if counts else 0.0


def prompts(llm, batch: int, seed: int) -> list[dict]:
    """`batch` different 160-token prompts, each with the one image (distinct text: distinct experts chosen)."""
    processor = llm.processor if isinstance(llm, HFBackend) else llm.engine.processor
    images = request_images(processor, [], [IMAGE], 1)
    return [r.as_prompt() for r in synthetic_requests(processor, INPUT_LEN, batch, images, seed=seed)]


def decode(llm, batch: int, output_len: int, seed: int) -> float:
    """Seconds per decode step (first token to last) of `batch` requests prefilled together."""
    outs = llm.generate(prompts(llm, batch, seed), SamplingParams(temperature=0, max_tokens=output_len,
                                                                   ignore_eos=True), use_tqdm=False)
    steps = [(o.times.token_times[-1] - o.times.token_times[0]) / (output_len - 1) for o in outs]
    return max(steps)


def stranger_cores(busy: float, own: float, wall: float) -> float:
    """Cores other processes kept busy over `wall` seconds (this process's own CPU time taken out)."""
    return max(0.0, (machine_busy_seconds() - busy - (process_seconds(os.getpid()) - own)) / wall)


PATIENCE = [120.0]


def wait_for_quiet(limit: float = 0.15) -> None:
    """Returns once other processes used under `limit` cores over 2 s, or after --patience seconds of waiting."""
    deadline = time.perf_counter() + PATIENCE[0]
    while True:
        busy, own, start = machine_busy_seconds(), process_seconds(os.getpid()), time.perf_counter()
        time.sleep(2)
        if stranger_cores(busy, own, time.perf_counter() - start) < limit or time.perf_counter() > deadline:
            return
        time.sleep(5)


def compare(name: str, folder: str, rounds: int, profile: bool) -> list[dict]:
    common = dict(load_format="dummy", device="cpu", dtype="bfloat16", max_model_len=1024, max_num_seqs=max(BATCHES))
    start = time.perf_counter()
    ours = LLM(folder, enable_prefix_caching=False, **common)
    hf = HFBackend.from_folder(folder, **common)
    hf_model = hf.reference.model
    counter = ExpertCounter(ours.engine.runner.model)
    hf_experts = getattr(hf_model.config.text_config, "_experts_implementation", None)
    print(f"# {name}: both loaded in {time.perf_counter() - start:.0f} s", flush=True)
    for llm in (ours, hf):  # warm-up at every batch's shapes: allocator growth, oneDNN's kernels
        for batch in BATCHES:
            decode(llm, batch, 3, seed=0)
    rows = []
    for r in range(rounds):
        for batch in BATCHES:
            tries = []
            for _ in range(RETRIES):  # a cell during which other processes took CPU time is measured again
                wait_for_quiet()
                tries.append(cell(ours, hf, hf_model, counter, batch, seed=r + 1))
                if tries[-1]["strangers"] < 0.2:
                    break
            row = min(tries, key=lambda t: t["strangers"])
            rows.append(dict(row, shape=name, round=r + 1, batch=batch, hf_experts=hf_experts))
            print(f"# {name}, round {r + 1}, batch {batch}: ours {row['ours'] * 1e3:.1f} ms, HF {row['hf'] * 1e3:.1f} "
                  f"ms, floor {row['floor'] * 1e3:.1f} ms ({row['bytes'] / 1e9:.3f} GB / {row['bandwidth'] / 1e9:.1f} "
                  f"GB/s; {row['experts']:.1f} experts a layer), other processes {row['strangers']:.2f} cores "
                  f"({len(tries)} tries)", flush=True)
    if profile:
        for side, llm in (("ours", ours), ("HF", hf)):
            wait_for_quiet()
            profile_decode(f"{name}, {side}", llm)
        if counter.layers:
            wait_for_quiet()
            experts_read_speed(ours.engine.runner.model)
    del ours, hf, hf_model, counter
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give the freed heap back: the next shape's two copies need it
    return rows


def cell(ours, hf, hf_model, counter: ExpertCounter, batch: int, seed: int) -> dict:
    """One decode of ours then HF's at `batch`, the read bandwidth measured just before and after ours."""
    busy, own, start = machine_busy_seconds(), process_seconds(os.getpid()), time.perf_counter()
    before, mark = read_bandwidth_now(), len(counter.counts)
    ours_s = decode(ours, batch, DECODE_TOKENS, seed=seed)
    bandwidth = max(before, read_bandwidth_now())
    experts = counter.mean_since(mark) if counter.layers else 0.0
    hf_s = decode(hf, batch, DECODE_TOKENS, seed=seed)
    step_bytes = decode_bytes(hf_model, experts)
    return dict(ours=ours_s, hf=hf_s, bytes=step_bytes, bandwidth=bandwidth, floor=step_bytes / bandwidth,
                experts=experts, strangers=stranger_cores(busy, own, time.perf_counter() - start))


def experts_read_speed(model: torch.nn.Module, repeats: int = 30) -> None:
    """One MoE layer's experts for one token (8 of 128 chosen at random, another 8 each time): our layer's
    native form (F.linear on each expert's weights) against the same experts through our decode kernel
    (cpu.linear, cpu.silu_mul), as read bandwidth (the chosen experts' bytes / time), median of `repeats`."""
    from vllm_utils.kernels import cpu

    moe = next(m for m in model.modules() if isinstance(m, FusedMoE))
    w13, w2 = moe.w13.weight, moe.w2.weight
    top_k = 8
    nbytes = top_k * (w13[0].numel() + w2[0].numel()) * w13.element_size()
    x = torch.randn(1, moe.hidden, dtype=torch.bfloat16)
    weights = torch.full((1, top_k), 1 / top_k, dtype=torch.bfloat16)

    def kernel(ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in ids[0].tolist():
            out += cpu.linear(cpu.silu_mul(cpu.linear(x, w13[e])), w2[e]) * weights[0, 0]
        return out

    ways = {"native (F.linear)": lambda ids: moe.forward_native(x, weights, ids)}
    if not cpu.unavailable_reason() and cpu.supports(w13[0]) and cpu.supports(w2[0]):
        ways["decode kernel"] = kernel
    times = {k: [] for k in ways}
    for _ in range(repeats):
        ids = torch.randperm(moe.num_experts)[:top_k][None]
        for k, fn in ways.items():
            start = time.perf_counter()
            fn(ids)
            times[k].append(time.perf_counter() - start)
    print(f"# one layer's experts for one token, {nbytes / 1e6:.1f} MB: " + "; ".join(
        f"{k} {statistics.median(t) * 1e3:.2f} ms = {nbytes / statistics.median(t) / 1e9:.1f} GB/s"
        for k, t in times.items()), flush=True)


def op_times(llm, output_len: int) -> dict[str, tuple[float, int]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode(llm, 1, output_len, seed=99)
    return {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}


def profile_decode(name: str, llm, steps: int = 32) -> None:
    """Where a batch-1 decode step's time goes: torch.profiler's self CPU time per operator over a run of
    `steps` + 2 tokens less that over a run of 2 tokens (the same prompt: the prefill cancels), per step. Our C
    kernels (called through ctypes) are no torch operator: their time is the step's time less the operators'."""
    short, full = op_times(llm, 2), op_times(llm, steps + 2)
    step_s = decode(llm, 1, steps + 2, seed=99)
    per_step = {k: ((t - short.get(k, (0, 0))[0]) / steps / 1e3, (n - short.get(k, (0, 0))[1]) / steps)
                for k, (t, n) in full.items()}
    ranked = sorted(per_step.items(), key=lambda kv: -kv[1][0])
    ops_ms = sum(ms for ms, _ in per_step.values())
    print(f"\n# {name}: decode step {step_s * 1e3:.1f} ms (batch 1); torch operators {ops_ms:.1f} ms of it "
          f"(self time on the calling thread); the rest {step_s * 1e3 - ops_ms:.1f} ms (C kernels, Python)")
    for key, (ms, calls) in ranked[:8]:
        print(f"#   {key}: {ms:.2f} ms a step, {calls:.0f} calls")


def cpu_name() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--moe-layers", type=int, default=4)
    parser.add_argument("--dense-layers", type=int, default=DENSE_TEXT["num_hidden_layers"])
    parser.add_argument("--profile", action="store_true", help="where a decode step's time goes (torch.profiler)")
    parser.add_argument("--shapes", default="dense,moe", help="which shapes to run: dense, moe or both")
    parser.add_argument("--patience", type=float, default=120.0,
                        help="seconds to wait, before each measurement, for other processes to leave the CPU")
    args = parser.parse_args()
    PATIENCE[0] = args.patience
    dense = config_folder(f"qwen3-vl-2b-text-{args.dense_layers}-layers", "Qwen3-VL-8B-Instruct",
                          dict(DENSE_TEXT, num_hidden_layers=args.dense_layers), DENSE_VISION, tie_word_embeddings=True)
    moe = config_folder(f"qwen3-vl-30b-a3b-{args.moe_layers}-layers", "Qwen3-VL-30B-A3B-Instruct",
                        dict(num_hidden_layers=args.moe_layers), {})
    shapes = args.shapes.split(",")
    rows = compare(f"dense, {args.dense_layers} layers", dense, args.rounds, args.profile) if "dense" in shapes else []
    if "moe" in shapes:
        rows += compare(f"MoE, {args.moe_layers} layers", moe, args.rounds, args.profile)
    print(f"\nCPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), transformers {transformers.__version__}; HF experts implementation: {rows[-1]['hf_experts']}; "
          f"median of {args.rounds} rounds; ratios per round, then their median\n")
    print("| shape | batch | decode bytes/step, GB | read GB/s | floor, ms/step | ours, ms/step | HF, ms/step | "
          "ours / floor | speed, ours / HF | other processes, cores |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    med = statistics.median
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for batch in BATCHES:
            rs = [r for r in rows if r["shape"] == shape and r["batch"] == batch]
            print(f"| {shape} | {batch} | {med(r['bytes'] for r in rs) / 1e9:.3f} | "
                  f"{med(r['bandwidth'] for r in rs) / 1e9:.1f} | {med(r['floor'] for r in rs) * 1e3:.1f} | "
                  f"{med(r['ours'] for r in rs) * 1e3:.1f} | {med(r['hf'] for r in rs) * 1e3:.1f} | "
                  f"{med(r['ours'] / r['floor'] for r in rs):.2f} | {med(r['hf'] / r['ours'] for r in rs):.2f} | "
                  f"{max(r['strangers'] for r in rs):.2f} |")


if __name__ == "__main__":
    main()
