"""The CPU thread count (OMP_NUM_THREADS, affinity, SMT siblings, cgroup quotas) and libgomp's settings, with the
machine's inputs faked; then once for real, in a fresh process whose affinity is narrowed before the package loads."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_utils.threads import (ThreadChoice, cgroup_cpu_limit, choose_threads, openmp_settings,
                                parse_cpu_max, parse_omp_num_threads, physical_cores)

from test_cli import cli_env


@pytest.mark.parametrize("value, threads", [("4", 4), (" 3 ", 3), ("4,2", 4), ("0", None), ("-1", None), ("two", None),
                                            ("", None), (None, None)])
def test_omp_num_threads_parsing(value, threads):
    assert parse_omp_num_threads(value) == threads


@pytest.mark.parametrize("text, cpus", [("max 100000\n", None), ("150000 100000\n", 1.5), ("50000 100000", 0.5),
                                        ("", None)])
def test_cpu_max_parsing(text, cpus):
    assert parse_cpu_max(text) == cpus


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_tightest_along_the_path(tmp_path):
    write(tmp_path / "cpu.max", "max 100000\n")
    write(tmp_path / "app/cpu.max", "150000 100000\n")  # the parent's limit binds the child too
    write(tmp_path / "app/job/cpu.max", "300000 100000\n")
    assert cgroup_cpu_limit("0::/app/job\n", tmp_path) == 1.5
    assert cgroup_cpu_limit("0::/app/job\n", tmp_path / "elsewhere") is None  # no cgroup files: no limit
    write(tmp_path / "app/cpu.max", "max 100000\n")
    assert cgroup_cpu_limit("0::/app/job\n", tmp_path) == 3.0


def test_cgroup_v1_quota(tmp_path):
    folder = tmp_path / "cpu,cpuacct/batch"
    write(folder / "cpu.cfs_quota_us", "250000\n")
    write(folder / "cpu.cfs_period_us", "100000\n")
    write(tmp_path / "cpu,cpuacct/cpu.cfs_quota_us", "-1\n")  # the root: no limit
    write(tmp_path / "cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit("5:memory:/batch\n4:cpu,cpuacct:/batch\n", tmp_path) == 2.5
    assert cgroup_cpu_limit("5:memory:/batch\n", tmp_path) is None  # no cpu controller


def fake_topology(root: Path, cores: dict[int, int]) -> Path:
    """sysfs topology for CPU -> core id, all on package 0."""
    for cpu, core in cores.items():
        write(root / f"cpu{cpu}/topology/core_id", f"{core}\n")
        write(root / f"cpu{cpu}/topology/physical_package_id", "0\n")
    return root


def test_smt_siblings_count_once(tmp_path):
    sysfs = fake_topology(tmp_path, {0: 0, 1: 0, 2: 1, 3: 1})
    assert physical_cores([0, 1, 2, 3], sysfs) == 2
    assert physical_cores([0, 2], sysfs) == 2
    assert physical_cores([1], sysfs) == 1
    assert physical_cores([0, 1, 7], sysfs) == 2  # no topology for CPU 7: it counts as a core of its own


def test_thread_count_choice(tmp_path):
    sysfs = fake_topology(tmp_path, {cpu: cpu for cpu in range(8)})
    assert choose_threads({}, range(8), None, sysfs).threads == 8
    assert choose_threads({}, [2, 5], None, sysfs).threads == 2  # only the CPUs the affinity allows
    capped = choose_threads({}, range(8), 2.5, sysfs)  # a quota is rounded up
    assert capped.threads == 3 and "quota of 2.5 CPUs" in capped.reason
    assert choose_threads({}, range(8), 0.2, sysfs).threads == 1
    assert choose_threads({}, range(2), 4.0, sysfs).threads == 2  # a quota above the cores changes nothing
    user = choose_threads({"OMP_NUM_THREADS": "6"}, [0], 1.0, sysfs)  # the user's count wins over both
    assert user == ThreadChoice(6, "OMP_NUM_THREADS=6")
    assert choose_threads({"OMP_NUM_THREADS": "x"}, [0, 1], None, sysfs).threads == 2  # unreadable: ignored


def test_openmp_settings_leave_the_users_alone():
    choice = ThreadChoice(3, "test")
    assert openmp_settings({}, choice) == {"OMP_NUM_THREADS": "3"}
    assert openmp_settings({"OMP_NUM_THREADS": "1"}, choice) == {}


def run_python(script: str) -> list:
    env = {k: v for k, v in cli_env().items() if k not in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


ONE_CPU = "import json, os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "


def test_importing_the_package_first_sets_the_thread_count():
    script = ONE_CPU + "import vllm_utils, torch; print(json.dumps([torch.get_num_threads(), os.environ['OMP_NUM_THREADS']]))"
    assert run_python(script) == [1, "1"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to narrow to one")
def test_the_cpu_platform_lowers_torchs_count_to_the_usable_cpus():
    """torch imported first counts the cores it saw then; the platform lowers that to what the affinity allows."""
    script = ("import json, os, torch; torch.get_num_threads(); " + ONE_CPU.removeprefix("import json, os; ")
              + "from vllm_utils.platforms.cpu import CpuPlatform; before = torch.get_num_threads(); CpuPlatform(); "
                "print(json.dumps([before, torch.get_num_threads(), os.environ.get('OMP_NUM_THREADS')]))")
    before, after, variable = run_python(script)
    assert before > 1 and after == 1
    assert variable is None  # torch had loaded libgomp already: too late to set it


class FakeMachine:
    """`cores` CPUs, `others` of them held by other processes; a clock and a run-queue counter that move as a team
    of a given size would make them (runnable threads share the cores evenly)."""

    def __init__(self, cores: int) -> None:
        self.cores, self.others, self.now, self.waited, self.sizes = cores, 0, 0.0, 0.0, []

    def forward(self, follower, seconds: float) -> None:
        follower.before_step()
        runnable = follower.size + self.others
        self.now += seconds
        self.waited += seconds * follower.size * max(0, runnable - self.cores) / runnable

    def run(self, follower, steps: int, seconds: float) -> None:
        for _ in range(steps):
            self.forward(follower, seconds)

    def follower(self, full: int):
        from vllm_utils.platforms.cpu_team import TeamFollower

        return TeamFollower(full, self.sizes.append, clock=lambda: self.now, waited=lambda: self.waited)


def test_the_team_shrinks_while_its_threads_wait_and_tries_again_later():
    from vllm_utils.platforms.cpu_team import RETRY_FIRST, WINDOW

    machine = FakeMachine(cores=2)
    team = machine.follower(2)
    for _ in range(8):
        machine.forward(team, 0.6 * WINDOW)  # a quiet machine: the team keeps its size
    assert machine.sizes == [] and team.size == 2
    machine.others = 1  # a neighbour takes a core
    machine.run(team, 3, 1.01 * WINDOW)
    assert machine.sizes == [1]
    while len(machine.sizes) < 3 and machine.now < 100:  # it tries two threads again, and returns to one
        machine.forward(team, 1.01 * WINDOW)
    assert machine.sizes == [1, 2, 1] and team.retry_after == 2 * RETRY_FIRST  # and waits longer to try again
    tried = machine.now
    while len(machine.sizes) < 5 and machine.now < 100:
        machine.forward(team, 1.01 * WINDOW)
    assert machine.sizes == [1, 2, 1, 2, 1] and machine.now - tried >= 2 * RETRY_FIRST
    machine.others = 0  # the neighbour has gone: the next try keeps the full team
    for _ in range(int(6 * RETRY_FIRST / WINDOW)):
        machine.forward(team, 1.01 * WINDOW)
    assert machine.sizes == [1, 2, 1, 2, 1, 2] and team.retry_after == RETRY_FIRST
    assert "on fewer threads (down to 1)" in team.summary()


def test_the_team_shrinks_by_the_cores_it_lacks_and_never_below_one():
    from vllm_utils.platforms.cpu_team import WINDOW

    machine = FakeMachine(cores=16)
    team = machine.follower(16)
    machine.others = 3
    machine.run(team, 3, 1.01 * WINDOW)
    assert machine.sizes == [13]  # 16 threads beside 3: 2.5 cores' worth of waiting
    machine.others = 40
    machine.run(team, 3, 1.01 * WINDOW)
    assert machine.sizes[-1] == 1


def test_the_run_queue_counter_reads_this_process(tmp_path):
    from vllm_utils.platforms.cpu_team import run_queue_seconds

    assert run_queue_seconds() >= 0
    for tid, line in (("10", "500 2000000000 7\n"), ("11", "1 500000000 2\n"), ("12", "")):
        write(tmp_path / tid / "schedstat", line)
    assert run_queue_seconds(str(tmp_path)) == 2.5


def test_the_team_is_lent_whole_at_rest_and_taken_up_again_at_its_size():
    from vllm_utils.platforms.cpu_team import RETRY_FIRST, WINDOW

    machine = FakeMachine(cores=2)
    team = machine.follower(2)
    machine.others = 1
    machine.run(team, 3, 1.01 * WINDOW)
    team.rest()
    assert machine.sizes == [1, 2]  # torch work between our runs gets every core
    machine.now += 0.5 * RETRY_FIRST  # a pause between two runs, shorter than the backoff
    machine.forward(team, 1.01 * WINDOW)
    assert machine.sizes == [1, 2, 1] and team.size == 1  # the next run starts where the last one ended


def test_the_first_decision_comes_soon_enough_for_a_short_run():
    machine = FakeMachine(cores=2)
    team = machine.follower(2)
    machine.others = 1  # busy from the start
    machine.run(team, 3, 0.012)  # a short run's steps (a small model's prefill and decodes)
    assert machine.sizes == [1]
