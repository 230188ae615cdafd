"""The CPU path beside another process: ours, HF transformers (`--backend hf`) and ours on one thread, each alone,
beside a CPU-bound neighbour at normal priority and beside one at nice 19, on two workloads:

- tiny: the tiny random demo LLaVA's `--perf` (100-token prompt, 64 output tokens): the run's latency
  (`latency_num_prompts`) and its decode latency per token;
- 1.26B: cpu_bench.py's LLaVA-shaped 1.26B checkpoint, one 600-token image prompt: decode ms/token over 16 tokens.

Every case runs in a fresh process (libgomp reads its settings once, when torch loads). `--code NAME=DIR` (repeatable)
runs the cases against the package in DIR (a checkout, e.g. of an older commit), interleaved case by case; default:
this checkout. A case is timed only when no other process loads the CPU: before it, the script waits for a quiet
machine; after it, it compares the CPU time the machine spent with its own and the neighbour's, and runs the case
again if a stranger took more than 10% of a core (quiet.py).

    .venv/bin/python benchmarks/contention.py [--code before=/tmp/old --code after=.] [--rounds N]
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quiet import run_quietly

HERE = Path(__file__).resolve().parent
PY = sys.executable
LOADS = ("alone", "neighbour", "nice 19")
ENGINES = ("ours", "hf", "ours, 1 thread")
WORKLOADS = ("tiny", "1.26B")
DECODE_TOKENS = 16


def case_command(workload: str, engine: str) -> list[str]:
    if workload == "tiny":
        return [PY, "-m", "vllm_utils.benchmark_vision_language", "--perf", "--input-len", "100", "--output-len", "64",
                "--num-prompts", "1", *(["--backend", "hf"] if engine == "hf" else [])]
    return [PY, str(Path(__file__).resolve()), "--worker", "hf" if engine == "hf" else "ours"]


def run_case(workload: str, engine: str, code: Path, neighbour: int | None) -> dict:
    """One case in a fresh process, timed while no stranger loaded the CPU; its figures."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    if engine == "ours, 1 thread":
        env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as work:  # the CLI writes its CSV in the working directory
        run = run_quietly(case_command(workload, engine), neighbour, cwd=work, env=env)
    return parse(workload, run.stdout)


def parse(workload: str, stdout: str) -> dict:
    if workload == "tiny":
        start = stdout.index("***Perf Info***") + len("***Perf Info***")
        info = json.JSONDecoder().raw_decode(stdout[start:].lstrip())[0]
        return {"run_ms": float(info["latency_num_prompts"].split()[0]),
                "decode_ms": float(info["decode_latency_per_token"].split()[0])}
    return json.loads(stdout.strip().splitlines()[-1])


def worker(engine: str) -> None:
    """The 1.26B case, in this process: warm up, then one prompt decoding DECODE_TOKENS + 1 tokens."""
    import vllm_utils  # first: the package sets libgomp's threads and wait before torch loads it

    import cpu_bench

    folder = cpu_bench.build_checkpoint()
    common = dict(device="cpu", dtype="bfloat16", max_model_len=1024, max_num_seqs=1)
    if engine == "hf":
        from vllm_utils.modes.backends import HFBackend

        llm = HFBackend.from_folder(folder, **common)
    else:
        llm = vllm_utils.LLM(folder, enable_prefix_caching=False, **common)
    cpu_bench.measure(llm, 1, 2)
    figures = cpu_bench.measure(llm, 1, DECODE_TOKENS + 1)
    print(json.dumps({"decode_ms": figures["tpot"] * 1e3, "ttft_s": figures["ttft"]}))


def start_neighbour(load: str) -> int | None:
    if load == "alone":
        return None
    nice = ["nice", "-n", "19"] if load == "nice 19" else []
    pid = subprocess.Popen([*nice, PY, "-c", "while True: pass"]).pid
    time.sleep(1)
    return pid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", action="append", default=[], help="NAME=DIR: the package checkout to run")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every case; the table gives the median")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--loads", nargs="+", choices=LOADS, default=list(LOADS))
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--table", metavar="FILE", help="print the table of the JSON lines an earlier run printed")
    parser.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.table:
        results, codes = {}, {}
        for line in Path(args.table).read_text().splitlines():
            if line.startswith("{"):
                case = json.loads(line)
                key = tuple(case.pop(k) for k in ("workload", "engine", "code", "load"))
                results.setdefault(key, []).append(case)
                codes[key[2]] = None
        return print_table(results, codes)
    codes = dict(c.split("=", 1) for c in args.code) or {"this": str(HERE.parent)}
    codes = {name: Path(folder).resolve() for name, folder in codes.items()}
    results: dict[tuple, list[dict]] = {}
    for _ in range(args.rounds):
        for load in args.loads:
            neighbour = start_neighbour(load)
            try:
                for workload in args.workloads:
                    for engine in args.engines:
                        for name, code in codes.items():
                            figures = run_case(workload, engine, code, neighbour)
                            results.setdefault((workload, engine, name, load), []).append(figures)
                            print(json.dumps({"workload": workload, "engine": engine, "code": name, "load": load,
                                              **figures}), flush=True)
            finally:
                if neighbour is not None:
                    os.kill(neighbour, signal.SIGTERM)
    print_table(results, codes)


def print_table(results: dict, codes: dict) -> None:
    """The median of the rounds per case; the last two columns: the slowest load against one thread alone (the
    target: at most 1.5) and against one thread beside the same load (at most 1: never slower than one thread)."""
    best = {key: {k: statistics.median(f[k] for f in runs) for k in runs[0]} for key, runs in results.items()}
    loads = [load for load in LOADS if any(key[3] == load for key in best)]
    rounds = len(next(iter(results.values())))
    print(f"\nCPU: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; median of {rounds} rounds\n")
    print("| figure | engine | code | " + " | ".join(loads) + " | worst / 1 thread alone | worst / 1 thread, same "
          "load |")
    print("|---|---|---|" + "---|" * (len(loads) + 2))
    figures = [("tiny", "run_ms", "tiny --perf: run, ms"), ("tiny", "decode_ms", "tiny --perf: decode, ms/token"),
               ("1.26B", "decode_ms", "1.26B: decode, ms/token")]
    for workload, key, title in figures:
        if not any(k[0] == workload for k in best):
            continue
        for engine in [e for e in ENGINES if any(k[1] == e for k in best)]:
            for name in codes:
                row = [best[(workload, engine, name, load)][key] for load in loads]
                one = [best[(workload, "ours, 1 thread", name, load)][key] for load in loads]
                cells = " | ".join(f"{x:.2f}" if x < 10 else f"{x:.0f}" for x in row)
                print(f"| {title} | {engine} | {name} | {cells} | {max(row) / one[0]:.2f} | "
                      f"{max(x / o for x, o in zip(row, one)):.2f} |")


if __name__ == "__main__":
    main()
