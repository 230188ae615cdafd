"""Where a decode step's time goes beside a busy process: the OpenMP parallel regions of each step (counted and
timed by the LD_PRELOAD probe omp_regions.c), alone, beside a CPU-bound neighbour at normal priority and at nice 19.
A region ends in a barrier that waits for its slowest thread; a thread the OS has set aside to run the neighbour makes
the region last a scheduler time slice (milliseconds) instead of microseconds.

    .venv/bin/python benchmarks/omp_regions.py [--code DIR] [--workload tiny|1.26B] [--tokens N]

Cases, each in a fresh process (libgomp reads its settings when torch loads): the package's defaults; libgomp's
defaults with a fixed team (GOMP_SPINCOUNT=300000, VLLM_UTILS_CPU_FOLLOW_LOAD=0); OMP_WAIT_POLICY=PASSIVE with a
fixed team; one thread.
"""
import argparse
import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from contention import start_neighbour
from quiet import run_quietly

HERE = Path(__file__).resolve().parent
CASES = {
    "package defaults": {},
    "libgomp's spin, fixed team": {"GOMP_SPINCOUNT": "300000", "VLLM_UTILS_CPU_FOLLOW_LOAD": "0"},
    "passive wait, fixed team": {"OMP_WAIT_POLICY": "PASSIVE", "VLLM_UTILS_CPU_FOLLOW_LOAD": "0"},
    "one thread": {"OMP_NUM_THREADS": "1"},
}
LOADS = ("alone", "neighbour", "nice 19")


def probe_library() -> Path:
    """omp_regions.c built into a temporary folder (not through the package: importing it here would set its
    OpenMP settings in this process's environment, which every case inherits)."""
    target = Path(tempfile.mkdtemp()) / "omp_regions.so"
    subprocess.run([os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", str(HERE / "omp_regions.c"), "-o",
                    str(target)], check=True)
    return target


def worker(workload: str, tokens: int) -> None:
    """In the probed process: warm up, then one request; the regions of its decode steps."""
    from vllm_utils import LLM, SamplingParams
    from vllm_utils.modes.synthetic import synthetic_requests

    import numpy as np

    if workload == "tiny":
        from vllm_utils.testing.default_model import default_model

        llm, input_len = LLM(default_model().folder, device="cpu", max_model_len=1024,
                             enable_prefix_caching=False), 100
    else:
        import cpu_bench

        llm, input_len = LLM(cpu_bench.build_checkpoint(), device="cpu", dtype="bfloat16", max_model_len=1024,
                             enable_prefix_caching=False), 600
    probe = ctypes.CDLL(None)
    probe.omp_regions_count.restype = ctypes.c_long
    probe.omp_regions_seconds.restype = ctypes.POINTER(ctypes.c_float)

    def run(max_tokens: int) -> list[float]:
        prompts = [r.as_prompt() for r in synthetic_requests(llm.engine.processor, input_len, 1, None, seed=1)]
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        return llm.generate(prompts, params, use_tqdm=False)[0].times.token_times

    run(4)
    probe.omp_regions_reset()
    run(1)
    prefill_regions = probe.omp_regions_count()
    probe.omp_regions_reset()
    usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    times = run(tokens + 1)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    count = probe.omp_regions_count()
    decode = np.ctypeslib.as_array(probe.omp_regions_seconds(), (count,))[prefill_regions:].copy()
    decode = decode if len(decode) else np.zeros(1)
    print(json.dumps({
        "step_ms": (times[-1] - times[0]) / tokens * 1e3, "regions": (count - prefill_regions) / tokens,
        "region_ms": float(decode.sum()) / tokens * 1e3, "p50_us": float(np.median(decode)) * 1e6,
        "p90_us": float(np.percentile(decode, 90)) * 1e6, "p99_us": float(np.percentile(decode, 99)) * 1e6,
        "cores": (after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime) / wall}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", default=str(HERE.parent), help="the package checkout to run")
    parser.add_argument("--workload", choices=["tiny", "1.26B"], default="1.26B")
    parser.add_argument("--tokens", type=int, default=None, help="decode steps (default: 200 tiny, 24 1.26B)")
    parser.add_argument("--loads", nargs="+", choices=LOADS, default=list(LOADS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens = args.tokens or (200 if args.workload == "tiny" else 24)
    if args.worker:
        return worker(args.workload, tokens)
    probe = probe_library()
    print(f"{args.workload}, {tokens} decode steps; code {args.code}; {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}\n")
    print("| load | case | decode ms/step | regions/step | in regions, ms/step | region p50 / p90 / p99, µs | "
          "cores used |")
    print("|---|---|---|---|---|---|---|")
    for load in args.loads:
        neighbour = start_neighbour(load)
        try:
            for case, env in CASES.items():
                env = {**os.environ, "PYTHONPATH": str(Path(args.code).resolve()), "LD_PRELOAD": str(probe), **env}
                run = run_quietly([sys.executable, __file__, "--worker", "--workload", args.workload, "--tokens",
                                   str(tokens)], neighbour, env=env, cwd=HERE)
                f = json.loads(run.stdout.strip().splitlines()[-1])
                print(f"| {load} | {case} | {f['step_ms']:.2f} | {f['regions']:.0f} | {f['region_ms']:.2f} | "
                      f"{f['p50_us']:.0f} / {f['p90_us']:.0f} / {f['p99_us']:.0f} | {f['cores']:.2f} |", flush=True)
        finally:
            if neighbour is not None:
                os.kill(neighbour, signal.SIGTERM)


if __name__ == "__main__":
    main()
