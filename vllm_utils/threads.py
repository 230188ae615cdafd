"""How many threads the CPU path runs: a setting of libgomp (PyTorch's OpenMP runtime, which our C kernels share)
that it reads once, when it loads with torch, so `configure_openmp` puts it in the environment before that, unless
the user has.

The count: the user's OMP_NUM_THREADS; else the physical cores among the CPUs this process may run on
(sched_getaffinity), capped by its cgroup's CPU quota (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us`) rounded up.
While the engine runs, the team may shrink below it when other processes hold cores (platforms/cpu_team.py)."""
import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # where the count comes from, for the report


def parse_omp_num_threads(value: str | None) -> int | None:
    """The outermost level of OMP_NUM_THREADS ("8" or "8,2"), or None when unset or not a positive integer."""
    first = (value or "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` ("QUOTA PERIOD", or "max PERIOD" for no limit)."""
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return int(fields[0]) / int(fields[1])


def cgroup_cpu_limit(proc_cgroup: str, root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The tightest CPU quota on this process's cgroup and its ancestors, in CPUs; None without one. `proc_cgroup`
    is /proc/self/cgroup's text; `root` where the cgroup file systems are mounted."""
    limits = []
    for line in proc_cgroup.splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":  # cgroup v2
            limits += [parse_cpu_max(text) for text in _along(root, path, "cpu.max")]
        elif "cpu" in controllers.split(","):  # cgroup v1
            for mount in (root / controllers, root / "cpu"):
                quotas, periods = _along(mount, path, "cpu.cfs_quota_us"), _along(mount, path, "cpu.cfs_period_us")
                limits += [int(q) / int(p) for q, p in zip(quotas, periods) if int(q) > 0]
    limits = [limit for limit in limits if limit]
    return min(limits) if limits else None


def _along(mount: Path, path: str, name: str) -> list[str]:
    """The text of `name` in the cgroup at `path` under `mount` and in each of its ancestors that has it."""
    folder, texts = mount / path.strip("/"), []
    while True:
        try:
            texts.append((folder / name).read_text())
        except (OSError, ValueError):
            pass
        if folder == mount or mount not in folder.parents:
            return texts
        folder = folder.parent


def physical_cores(cpus: Iterable[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Distinct cores among `cpus` (SMT siblings count once); every CPU counts when the topology is not readable."""
    cores = set()
    for cpu in cpus:
        try:
            topology = sysfs / f"cpu{cpu}" / "topology"
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def choose_threads(environ: Mapping[str, str], cpus: Iterable[int], cpu_limit: float | None,
                   sysfs: Path = Path("/sys/devices/system/cpu")) -> ThreadChoice:
    """The thread count for these inputs: OMP_NUM_THREADS wins; else the cores among `cpus`, at most `cpu_limit`
    (a cgroup quota in CPUs) rounded up."""
    user = parse_omp_num_threads(environ.get("OMP_NUM_THREADS"))
    if user is not None:
        return ThreadChoice(user, f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}")
    cpus = sorted(cpus)
    cores = physical_cores(cpus, sysfs)
    reason = f"{cores} cores of the {len(cpus)} CPUs this process may use"
    if cpu_limit is not None and math.ceil(cpu_limit) < cores:
        return ThreadChoice(max(1, math.ceil(cpu_limit)), f"{reason}, capped by its cgroup's quota of "
                                                          f"{cpu_limit:g} CPUs")
    return ThreadChoice(cores, reason)


_CHOICE: ThreadChoice | None = None  # this process's, taken before configure_openmp set OMP_NUM_THREADS


def system_choice() -> ThreadChoice:
    """`choose_threads` for this process, as it was before `configure_openmp` set anything."""
    return _CHOICE or _choose_now()


def _choose_now() -> ThreadChoice:
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    try:
        proc_cgroup = Path("/proc/self/cgroup").read_text()
    except OSError:
        proc_cgroup = ""
    return choose_threads(os.environ, cpus, cgroup_cpu_limit(proc_cgroup))


def openmp_settings(environ: Mapping[str, str], choice: ThreadChoice) -> dict[str, str]:
    """The variables to add to `environ`: OMP_NUM_THREADS, the chosen count, unless the user has set it."""
    return {} if "OMP_NUM_THREADS" in environ else {"OMP_NUM_THREADS": str(choice.threads)}


def configure_openmp() -> None:
    """`openmp_settings` into this process's environment, before torch loads libgomp (after that, a no-op)."""
    global _CHOICE
    if "torch" in sys.modules or _CHOICE is not None:
        return
    _CHOICE = _choose_now()
    os.environ.update(openmp_settings(os.environ, _CHOICE))


def describe(threads: int) -> str:
    """Where a count of `threads` (what torch runs) comes from, and how idle threads wait, for the report."""
    choice = system_choice()
    source = choice.reason if threads == choice.threads else f"{choice.reason}; torch runs {threads}"
    policy, spin = os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")
    wait = f"OMP_WAIT_POLICY={policy}" if policy else f"GOMP_SPINCOUNT={spin}" if spin else "libgomp's default spin"
    return f"{source}; idle threads wait by {wait}"
