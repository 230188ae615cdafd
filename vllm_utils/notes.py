"""Notes to the user on stderr: once per run (a process, or one `main` call of the CLI), and from tensor-parallel
rank 0 only (every rank would say the same)."""
import sys

from vllm_utils.distributed import tp_rank

_said: set[str] = set()


def forget_notes() -> None:
    """A new run says its notes again."""
    _said.clear()


def note_once(message: str) -> None:
    if message not in _said and tp_rank() == 0:
        _said.add(message)
        print(f"note: {message}", file=sys.stderr)
