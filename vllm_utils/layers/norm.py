import torch
from torch import nn

from vllm_utils.layers import cpu_kernels, fused_cuda


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in float32 and cast back as transformers does. With `residual`, it first
    adds x into residual (in place, in the model dtype) and normalizes the sum: the decoder's
    `residual = residual + x; x = norm(residual)` in one pass."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if fused_cuda.available(x) and x.dim() == 2:
            return fused_cuda.add_rmsnorm(x, self.weight, self.eps, residual)
        if cpu_kernels.supports_rmsnorm(x, self.weight, residual):
            return cpu_kernels.rmsnorm(x, self.weight, self.eps, residual)
        if residual is not None:
            residual.add_(x)
            x = residual
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
