"""Qwen3.5's hybrid decoder on this CPU (issue #34): decode of Qwen/Qwen3.5-0.8B's shape, whole, random weights,
bf16, ours against HF transformers' `Qwen3_5ForConditionalGeneration` interleaved in one process, and against the
floor measured in the same run: the bytes one decode step reads and writes / the read bandwidth read just before
and after our decode.

The model: the bundled Qwen3.5-0.8B config (published: hidden 1024, 24 layers, three Gated DeltaNet layers to each
gated full-attention layer; DeltaNet with 16 key and 16 value heads of 128 and a 4-tap convolution, full attention
with 8 query heads and 2 key/value heads of 256, MLP 3584, tied embeddings over a 248320-token vocabulary; the
12-block vision tower of width 768) run with random weights on both sides (`load_format="dummy"`, as
cpu_bench_qwen3_vl.py does; the tiny builder's trained tokenizer cannot carry the published vocabulary, and the
weights' values do not change the work).

The request, as cpu_bench_qwen3_vl.py's (its `decode`, imported): one black 256x256 image (64 positions) in a
160-token prompt, greedy, EOS ignored, 17 tokens; at batch 4, four such prompts of different text. Per round and
batch, ours then HF. Before each measurement the script waits for other processes to leave the CPU (--patience),
and measures again (up to 3 times) when they took 0.2 cores or more meanwhile.

The floor's bytes a step: the decoder layers' weights, the final norm and the tied LM head (counted on HF's model),
plus for every sequence each DeltaNet layer's recurrent state (float32) and convolution state (bf16), read and
written once, and each full-attention layer's KV (bf16) read. With --profile: where a batch-1 (and batch-4) step of
ours goes, by wall time of the parts (forward hooks, no profiler) and torch.profiler's operators once.

    cd benchmarks && ../.venv/bin/python cpu_bench_qwen3_5.py [--rounds 3] [--profile]
"""
import argparse
import gc
import os
import statistics
import time
from collections import defaultdict

from vllm_utils import LLM  # before torch: the package sets libgomp's threads and wait before it loads

import torch
from vllm_utils.modes.backends import HFBackend

from cpu_bench import read_bandwidth_now
from cpu_bench_qwen3_vl import (INPUT_LEN, PATIENCE, cpu_name, decode, stranger_cores,
                                wait_for_quiet)
from quiet import machine_busy_seconds, process_seconds

MODEL = "Qwen/Qwen3.5-0.8B"
DECODE_TOKENS, BATCHES, RETRIES = 17, (1, 4), 3


def weight_bytes(hf_model: torch.nn.Module) -> int:
    """Weights a decode step reads, counted on HF's model (ours repacks some): the decoder layers, the final
    norm and the LM head (tied: the embeddings); the embedding rows read are negligible."""
    return sum(p.numel() * p.element_size() for name, p in hf_model.named_parameters(remove_duplicate=False)
               if name.startswith(("model.language_model.layers", "model.language_model.norm", "lm_head")))


def state_bytes(text) -> int:
    """One sequence's recurrent and convolution state over all DeltaNet layers, read once and written once."""
    keys, values = text.linear_num_key_heads * text.linear_key_head_dim, \
        text.linear_num_value_heads * text.linear_value_head_dim
    recurrent = text.linear_num_value_heads * text.linear_key_head_dim * text.linear_value_head_dim * 4
    conv = (2 * keys + values) * (text.linear_conv_kernel_dim - 1) * 2
    return 2 * (recurrent + conv) * text.layer_types.count("linear_attention")


def kv_bytes(text, context: int) -> int:
    """KV (bf16) one sequence's step reads at `context` positions, over the full-attention layers."""
    return 2 * text.num_key_value_heads * text.head_dim * 2 * context * text.layer_types.count("full_attention")


class PartTimer:
    """Wall time of our model's parts in decode steps (forward hooks; a step whose first layer takes more rows
    than `batch` is a prefill, not counted): the whole DeltaNet layers and within them the delta rule
    (GatedDeltaRule: the states' gather, the einsums, the scatter), the five projections and the gated norm; the
    gated attention layers, the MLPs, the LM head."""

    def __init__(self, model: torch.nn.Module, batch: int) -> None:
        self.totals, self.starts, self.handles, self.decoding = defaultdict(float), {}, [], False
        layers = model.language_model.layers
        self.handles.append(layers[0].register_forward_pre_hook(  # (positions, x, residual, meta, keep)
            lambda m, args: setattr(self, "decoding", args[1].shape[0] <= batch)))
        parts = []
        for layer in layers:
            if hasattr(layer, "linear_attn"):
                net = layer.linear_attn
                parts += [("delta rule", net.rule), ("DeltaNet layers", net), ("DeltaNet gated norms", net.norm)]
                parts += [("DeltaNet projections", m) for m in (net.in_proj_qkv, net.in_proj_z, net.in_proj_b,
                                                                 net.in_proj_a, net.out_proj)]
            else:
                parts.append(("full-attention layers", layer.self_attn))
            parts.append(("MLPs", layer.mlp))
        parts.append(("LM head", model.lm_head))
        for name, module in parts:
            self.handles.append(module.register_forward_pre_hook(lambda m, args: self.pre(m)))
            self.handles.append(module.register_forward_hook(lambda m, args, out, n=name: self.post(m, n)))

    def pre(self, module) -> None:
        if self.decoding:
            self.starts[id(module)] = time.perf_counter()

    def post(self, module, name: str) -> None:
        start = self.starts.pop(id(module), None)
        if start is not None:
            self.totals[name] += time.perf_counter() - start

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def parts_per_step(llm, batch: int, steps: int = 32) -> tuple[float, dict[str, float]]:
    """(seconds a step, seconds a step in each part) of a `batch` decode of `steps` + 1 steps."""
    timer = PartTimer(llm.engine.runner.model, batch)
    try:
        step = decode(llm, batch, steps + 2, seed=99)
    finally:
        timer.remove()
    return step, {k: v / (steps + 1) for k, v in timer.totals.items()}


def profiled_ops(llm, batch: int, steps: int = 16) -> tuple[dict, float]:
    """torch.profiler's self CPU time per operator a decode step, over `steps` + 1 decode steps of a `batch`
    decode (the profiler starts at the first decode step's first layer: the prefill is left out), and the
    step's time under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    prof, began = profile(activities=[ProfilerActivity.CPU]), []

    def start(_module, args) -> None:
        if not began and args[1].shape[0] <= batch:  # (positions, x, residual, meta, keep)
            began.append(time.perf_counter())
            prof.start()

    hook = llm.engine.runner.model.language_model.layers[0].register_forward_pre_hook(start)
    try:
        decode(llm, batch, steps + 2, seed=99)
    finally:
        hook.remove()
    prof.stop()
    step = (time.perf_counter() - began[0]) / (steps + 1)
    return {e.key: (e.self_cpu_time_total / (steps + 1) / 1e6, e.count / (steps + 1))
            for e in prof.key_averages()}, step


def profile_report(ours, batch: int, step_bytes: float, bandwidth: float) -> None:
    wait_for_quiet()
    step, parts = parts_per_step(ours, batch)
    print(f"\n# ours, batch {batch}: decode step {step * 1e3:.1f} ms (floor {step_bytes / bandwidth * 1e3:.1f} ms); "
          f"by part (forward hooks, wall time):")
    parts["DeltaNet, the rest (convolution step, g and beta, reshapes)"] = parts.get("DeltaNet layers", 0.0) - sum(
        parts.get(k, 0.0) for k in ("delta rule", "DeltaNet gated norms", "DeltaNet projections"))
    for name in ("DeltaNet layers", "delta rule", "DeltaNet projections", "DeltaNet gated norms",
                 "DeltaNet, the rest (convolution step, g and beta, reshapes)", "full-attention layers", "MLPs",
                 "LM head"):
        ms = parts.get(name, 0.0) * 1e3
        indent = "  " if name != "DeltaNet layers" and name.startswith(("delta", "DeltaNet")) else ""
        print(f"#   {indent}{name}: {ms:.2f} ms a step "
              f"({ms / (step * 1e3):.0%})")
    wait_for_quiet()
    per_op, step = profiled_ops(ours, batch)
    ops_s = sum(s for s, _ in per_op.values())
    print(f"# torch.profiler, batch {batch}: step {step * 1e3:.1f} ms under the profiler; torch operators' self time "
          f"{ops_s * 1e3:.1f} ms a step (the rest: our C kernels through ctypes, Python)")
    for key, (s, calls) in sorted(per_op.items(), key=lambda kv: -kv[1][0])[:10]:
        print(f"#   {key}: {s * 1e3:.2f} ms a step, {calls:.0f} calls")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="where our decode step's time goes")
    parser.add_argument("--patience", type=float, default=300.0,
                        help="seconds to wait, before each measurement, for other processes to leave the CPU")
    args = parser.parse_args()
    PATIENCE[0] = args.patience
    common = dict(load_format="dummy", device="cpu", dtype="bfloat16", max_model_len=1024, max_num_seqs=max(BATCHES))
    start = time.perf_counter()
    ours = LLM(MODEL, **common)
    hf = HFBackend.from_folder(MODEL, **common)
    hf_model = hf.reference.model
    text = hf_model.config.text_config
    weights, state = weight_bytes(hf_model), state_bytes(text)
    print(f"# both loaded in {time.perf_counter() - start:.0f} s; weights a step {weights / 1e9:.3f} GB, state a "
          f"sequence {state / 1e6:.1f} MB read + written", flush=True)
    for llm in (ours, hf):  # warm-up at every batch's shapes: allocator growth, oneDNN's kernels
        for batch in BATCHES:
            decode(llm, batch, 3, seed=0)

    def cell(batch: int, seed: int) -> dict:
        before = read_bandwidth_now()
        ours_s = decode(ours, batch, DECODE_TOKENS, seed=seed)
        bandwidth = max(before, read_bandwidth_now())
        return dict(ours=ours_s, hf=decode(hf, batch, DECODE_TOKENS, seed=seed), bandwidth=bandwidth)

    rows = []
    for r in range(args.rounds):
        for batch in BATCHES:
            tries = []
            for _ in range(RETRIES):
                wait_for_quiet()
                busy, own, t0 = machine_busy_seconds(), process_seconds(os.getpid()), time.perf_counter()
                row = cell(batch, r + 1)
                row["strangers"] = stranger_cores(busy, own, time.perf_counter() - t0)
                tries.append(row)
                if row["strangers"] < 0.2:
                    break
            row = min(tries, key=lambda t: t["strangers"])
            step_bytes = weights + batch * (state + kv_bytes(text, INPUT_LEN + DECODE_TOKENS // 2))
            row.update(round=r + 1, batch=batch, bytes=step_bytes, floor=step_bytes / row["bandwidth"],
                       state=batch * state)
            rows.append(row)
            print(f"# round {r + 1}, batch {batch}: ours {row['ours'] * 1e3:.1f} ms, HF {row['hf'] * 1e3:.1f} ms, "
                  f"floor {row['floor'] * 1e3:.1f} ms ({step_bytes / 1e9:.3f} GB / {row['bandwidth'] / 1e9:.1f} "
                  f"GB/s), other processes {row['strangers']:.2f} cores ({len(tries)} tries)", flush=True)
    if args.profile:
        for batch in BATCHES:
            rs = [r for r in rows if r["batch"] == batch]
            profile_report(ours, batch, rs[0]["bytes"], statistics.median(r["bandwidth"] for r in rs))
    del ours, hf, hf_model
    gc.collect()
    import transformers

    med = statistics.median
    print(f"\nQwen3.5-0.8B-shaped, whole (random weights, bf16); CPU: {cpu_name()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; a "
          f"{INPUT_LEN}-token prompt with one 256x256 image; median of {args.rounds} rounds, ratios per round then "
          f"their median\n")
    print("| batch | bytes a step, GB (state) | read GB/s | floor, ms/step | ours, ms/step | HF, ms/step | "
          "ours / floor | speed, ours / HF (HF / ours) | other processes, cores |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in BATCHES:
        rs = [r for r in rows if r["batch"] == batch]
        print(f"| {batch} | {med(r['bytes'] for r in rs) / 1e9:.3f} ({rs[0]['state'] / 1e9:.3f}) | "
              f"{med(r['bandwidth'] for r in rs) / 1e9:.1f} | {med(r['floor'] for r in rs) * 1e3:.1f} | "
              f"{med(r['ours'] for r in rs) * 1e3:.1f} | {med(r['hf'] for r in rs) * 1e3:.1f} | "
              f"{med(r['ours'] / r['floor'] for r in rs):.2f} | {med(r['hf'] / r['ours'] for r in rs):.2f} | "
              f"{max(r['strangers'] for r in rs):.2f} |")


if __name__ == "__main__":
    main()
