import torch
import torch.nn.functional as F

from vllm_utils.errors import UserError
from vllm_utils.layers.op import Op

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "relu": F.relu,
}


def check_activation(name: str, field: str = "hidden_act") -> str:
    if name not in ACTIVATIONS:
        raise UserError(f"{field} '{name}' is not supported; supported: {', '.join(ACTIVATIONS)}")
    return name


class _NamedActivation(Op):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = check_activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


class Activation(_NamedActivation):
    """An elementwise activation by its transformers name (`hidden_act`)."""

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.name](x)


class ActAndMul(_NamedActivation):
    """act(gate) * up for a fused gate_up projection (the gated MLP of Llama-style decoders)."""

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return ACTIVATIONS[self.name](gate) * up
