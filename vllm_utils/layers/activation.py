import torch
import torch.nn.functional as F
from torch import nn

from vllm_utils.errors import UserError
from vllm_utils.layers import cpu_kernels, fused_cuda


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    if cpu_kernels.supports_activation(x):
        return cpu_kernels.quick_gelu(x)
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "relu": F.relu,
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise UserError(f"activation '{name}' is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class SiluAndMul(nn.Module):
    """silu(gate) * up for a fused gate_up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_cuda.available(x) and x.dim() == 2:
            return fused_cuda.silu_and_mul(x)
        if x.dim() == 2 and cpu_kernels.supports_activation(x):
            return cpu_kernels.silu_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
