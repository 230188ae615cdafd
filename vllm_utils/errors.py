"""The errors that reach users as a single line (see the CLI): bad input, and running out of memory."""


class UserError(Exception):
    """Bad input or an unusable environment: the message names the problem and the fix."""


_LESS_MEMORY = "lower --max-model-len, --batch-size or --num-kv-blocks, or use a smaller --dtype"


def one_line(error: BaseException) -> str | None:
    """What a user is told of `error` if it is theirs to fix; None for a bug, whose traceback they need."""
    if isinstance(error, UserError):
        return str(error)
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return f"out of device memory; {_LESS_MEMORY}"
    if isinstance(error, MemoryError):
        return f"out of host memory; {_LESS_MEMORY}"
    return None
