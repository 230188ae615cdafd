"""The one rule every computing layer follows: a native PyTorch form, and a device implementation chosen once."""
from typing import Callable

from torch import nn


class Op(nn.Module):
    """A layer whose computation has a native PyTorch form (`forward_native`: the reference, on every device) and
    may be given a device implementation of the same signature (`impl`), chosen once after loading by the
    platform. The implementation owns whatever state it needs (packed weights, read-ahead targets)."""

    impl: Callable | None = None

    def run(self, *args):
        return self.forward_native(*args) if self.impl is None else self.impl(*args)

    def forward_native(self, *args):
        raise NotImplementedError
