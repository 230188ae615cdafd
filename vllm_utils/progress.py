"""Progress on stderr for every phase that may take more than a second: live bars on a terminal, and
whole throttled lines when stderr goes to a file or a pipe (a log holds no carriage-return stream).

`VLLM_UTILS_PROGRESS_INTERVAL` sets the seconds between lines in the latter case (default 10)."""
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from tqdm import tqdm

from vllm_utils import envs

SHOW_AFTER_S = 1.0  # phases shorter than this stay quiet


def log_interval() -> float:
    return envs.progress_interval()


def stderr_is_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


class LineWriter:
    """A file for tqdm that turns its in-place redraws into whole lines, each printed once."""

    def __init__(self, stream) -> None:
        self.stream, self.last = stream, ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(disable: bool = False, **kwargs) -> tqdm:
    """tqdm on stderr, shown once its phase has run a second: redrawn on a terminal, else one line
    per `log_interval()` seconds."""
    if stderr_is_terminal():
        return tqdm(disable=disable, delay=SHOW_AFTER_S, **kwargs)
    interval = log_interval()
    return tqdm(disable=disable, file=LineWriter(sys.stderr), delay=min(SHOW_AFTER_S, interval),
                mininterval=interval, maxinterval=max(interval, 10.0), ascii=True, **kwargs)


class GenerationProgress:
    """Requests of one `generate` call: a bar over the tokens they may still generate (a request that
    stops early takes its unused budget off the total), so the rate shown is output tokens/s, with the
    finished prompts alongside."""

    def __init__(self, seqs: list, desc: str = "Generated tokens", disable: bool = False) -> None:
        self.seqs = seqs
        self.finished = 0
        self.bar = progress_bar(disable=disable, total=sum(s.max_output for s in seqs), desc=desc,
                                unit="tok", postfix=f"prompts 0/{len(seqs)}")

    def step(self, finished: list) -> None:
        """After an engine step that finished `finished`."""
        self.finished += len(finished)
        for seq in finished:
            self.bar.total -= seq.max_output - len(seq.output_token_ids)
        generated = sum(len(s.output_token_ids) for s in self.seqs)
        self.bar.set_postfix_str(f"prompts {self.finished}/{len(self.seqs)}", refresh=False)
        self.bar.update(generated - self.bar.n)

    def __enter__(self) -> "GenerationProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


@contextmanager
def phase(what: str, done: str | None = None) -> Iterator[None]:
    """One line when `what` starts, one with its time when it ends (both whole lines)."""
    print(f"{what} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"{done or what}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
