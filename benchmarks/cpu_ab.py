"""A/B of the CPU path on a quiet machine: this folder's `cpu_bench.py --quick --no-mistral` (ours vs HF on the
LLaVA-shaped 1.26B checkpoint) run against two checkouts of the package in turns, each run timed only while no other
process loads the CPU (quiet.py). This VM's memory bandwidth moves from minute to minute, so each figure is read as
ours / HF of the same run, and B against A as the ratio of those.

    .venv/bin/python benchmarks/cpu_ab.py A_DIR B_DIR [--rounds 2]
"""
import argparse
import os
import sys
import time
from pathlib import Path

from quiet import run_quietly

HERE = Path(__file__).resolve().parent
ROWS = {"TTFT, s": "ttft", "decode ms/token, batch 1": "decode", "output tokens/s, batch 4": "batch4"}
HIGHER_IS_BETTER = {"batch4"}


def figures(stdout: str) -> dict[str, tuple[float, float]]:
    """(ours, HF) for each of ROWS, from cpu_bench.py's markdown table."""
    found = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        for prefix, key in ROWS.items():
            if cells[0].startswith(prefix):
                found[key] = (float(cells[1]), float(cells[2]))
    return found


def speed_vs_hf(key: str, ours: float, hf: float) -> float:
    """How many times faster than HF ours ran (above 1: faster)."""
    return ours / hf if key in HIGHER_IS_BETTER else hf / ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sides = {"A": Path(args.a).resolve(), "B": Path(args.b).resolve()}
    print(f"A = {sides['A']}, B = {sides['B']}; {time.strftime('%Y-%m-%d')}\n")
    print("| round, side | TTFT s: ours (HF) | decode ms/token: ours (HF) | batch 4 tokens/s: ours (HF) |")
    print("|---|---|---|---|")
    speeds = {side: {key: [] for key in ROWS.values()} for side in sides}
    for round_ in range(1, args.rounds + 1):
        for side, folder in sides.items():
            run = run_quietly([sys.executable, str(HERE / "cpu_bench.py"), "--quick", "--no-mistral"], cwd=HERE,
                              env={**os.environ, "PYTHONPATH": str(folder)})
            found = figures(run.stdout)
            cells = " | ".join(f"{found[k][0]:g} ({found[k][1]:g})" for k in ROWS.values())
            print(f"| {round_}, {side} | {cells} |", flush=True)
            for key, (ours, hf) in found.items():
                speeds[side][key].append(speed_vs_hf(key, ours, hf))
    print("\n| figure | speed vs HF, A | speed vs HF, B | B / A |")
    print("|---|---|---|---|")
    for title, key in ROWS.items():
        a, b = (sum(speeds[s][key]) / len(speeds[s][key]) for s in sides)
        print(f"| {title} | {a:.2f} | {b:.2f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
