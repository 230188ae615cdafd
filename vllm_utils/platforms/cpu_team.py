"""The CPU thread team, resized while the engine runs. When other processes hold cores, our threads queue for them,
and every parallel region then waits for the thread the OS has set aside: a team that leaves those cores to the
others runs at the speed of the cores it has instead. So before a step (at most every WINDOW seconds) the team
shrinks by the cores' worth its threads spent waiting in the run queue; after a while it tries its full size again,
and keeps it if its threads no longer wait (waiting longer before the next try while the cores stay taken)."""
import os
import time
from collections import Counter
from collections.abc import Callable

WINDOW = 0.05  # seconds between two decisions (schedstat counts in nanoseconds: short windows read true)
# the first decision comes sooner: a short run (a small model's whole benchmark) is otherwise over before it
FIRST_WINDOW = 0.01
SHORT = 0.5  # cores' worth of run-queue waiting over a window that makes the team shrink
RETRY_FIRST, RETRY_MAX = 1.0, 32.0  # seconds on a smaller team before trying the full one, doubling while taken


def run_queue_seconds(tasks: str = "/proc/self/task") -> float:
    """Seconds this process's threads have spent ready to run but waiting for a CPU (schedstat's second field)."""
    total = 0
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            pass  # a thread that has just ended, or a kernel without schedstat
    return total / 1e9


class TeamFollower:
    """Sets the thread count through `set_threads`, between 1 and `full`, before each engine step (the vision
    encoder's included)."""

    def __init__(self, full: int, set_threads: Callable[[int], None], clock: Callable[[], float] = time.monotonic,
                 waited: Callable[[], float] = run_queue_seconds) -> None:
        self.full = self.size = full
        self.set_threads, self.clock, self.waited = set_threads, clock, waited
        self.window_start: float | None = None  # the first window opens at the first step
        self.waited_at_start = 0.0
        self.retry_after, self.retry_at, self.trying = RETRY_FIRST, 0.0, False
        self.lent = False  # resting: torch runs the full team until our next step
        self.decided = False
        self.steps: Counter[int] = Counter()  # team size -> steps run at it

    def before_step(self) -> None:
        if self.lent:  # back from rest on a smaller team: the time torch ran the full one is not ours to judge
            self.set_threads(self.size)
            self.lent, self.window_start = False, None
        now = self.clock()
        if self.window_start is None or now - self.window_start >= (WINDOW if self.decided else FIRST_WINDOW):
            waited = self.waited()
            if self.window_start is not None:
                self._decide((waited - self.waited_at_start) / (now - self.window_start), now)
                self.decided = True
            self.window_start, self.waited_at_start = now, waited
        self.steps[self.size] += 1

    def rest(self) -> None:
        """The engine has nothing left to run: torch gets the full team back until our next step (torch work
        between our runs, such as an HF reference in the same process, runs on every core it may use). The next
        step takes up the size we had. On the full team the window stays open, so runs that follow each other
        closely (a warm-up, then timed runs) are decided on as one."""
        if self.size != self.full:
            self.set_threads(self.full)
            self.lent = True

    def _decide(self, short: float, now: float) -> None:
        if short >= SHORT:  # other processes hold cores our threads want
            if self.trying:
                self.retry_after = min(2 * self.retry_after, RETRY_MAX)
            self.trying, self.retry_at = False, now + self.retry_after
            self._resize(max(1, self.size - round(short)))
        elif self.trying:  # the full team ran without waiting: the cores are free again
            self.trying, self.retry_after = False, RETRY_FIRST
        elif self.size < self.full and now >= self.retry_at:
            self.trying = True
            self._resize(self.full)

    def _resize(self, size: int) -> None:
        if size != self.size:
            self.size = size
            self.set_threads(size)

    def summary(self) -> str:
        """How much of the run the team spent below its full size, for the report; empty when none."""
        total = sum(self.steps.values())
        smaller = total - self.steps[self.full]
        if not smaller:
            return ""
        return (f"{smaller / total:.0%} of steps on fewer threads (down to {min(self.steps)}) while other "
                f"processes held cores")
