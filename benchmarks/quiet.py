"""Timing on a shared machine: run a benchmark command only while no other process loads the CPU, and run it again
when one did meanwhile. "Other" excludes the command itself and a neighbour the benchmark started on purpose: the
machine's busy CPU time (/proc/stat) minus theirs is what strangers took."""
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
STRANGER_LIMIT = 0.10  # cores, on average over a command: above it, its figures are not kept


def machine_busy_seconds() -> float:
    """CPU seconds the machine has spent busy (user, nice, system, interrupts) since boot; steal is not ours."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / TICK


def process_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(neighbour: int | None = None, window: float = 3.0) -> None:
    """Returns once strangers used under STRANGER_LIMIT cores over `window` seconds; checks every minute till then."""
    while True:
        busy, theirs = machine_busy_seconds(), process_seconds(neighbour)
        time.sleep(window)
        stranger = (machine_busy_seconds() - busy - (process_seconds(neighbour) - theirs)) / window
        if stranger < STRANGER_LIMIT:
            return
        print(f"# {time.strftime('%H:%M:%S')}: another process uses {stranger:.2f} cores; waiting", file=sys.stderr)
        time.sleep(60)


def run_quietly(command: list[str], neighbour: int | None = None, attempts: int = 10,
                **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True, **kwargs)` on a quiet machine; run again (up to
    `attempts` times) when strangers took STRANGER_LIMIT cores or more while it ran. Raises if it fails."""
    for _ in range(attempts):
        wait_for_quiet(neighbour)
        busy, theirs, ours, start = machine_busy_seconds(), process_seconds(neighbour), children_seconds(), time.time()
        run = subprocess.run(command, capture_output=True, text=True, **kwargs)
        wall = time.time() - start
        stranger = (machine_busy_seconds() - busy - (process_seconds(neighbour) - theirs)
                    - (children_seconds() - ours)) / wall
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
        if stranger < STRANGER_LIMIT:
            return run
        print(f"# another process used {stranger:.2f} cores during {' '.join(command[-3:])}; again", file=sys.stderr)
    raise RuntimeError(f"the machine never stayed quiet for the whole of {' '.join(command)}")
