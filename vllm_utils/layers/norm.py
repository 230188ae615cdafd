import torch
from torch import nn

from vllm_utils.layers.op import Op


class _RMSNormBase(Op):
    """With `residual`, a norm first adds x into residual (in place, in the model dtype) and normalizes the sum:
    the decoder's `residual = residual + x; x = norm(residual)` in one pass."""

    def __init__(self, hidden: int, eps: float, initial: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((hidden,), initial), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.run(x, residual)


class RMSNorm(_RMSNormBase):
    """Llama's RMSNorm, computed in float32 and cast back before the scale, as transformers does."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__(hidden, eps, 1.0)

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None:
            residual.add_(x)
            x = residual
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GemmaRMSNorm(_RMSNormBase):
    """Gemma's RMSNorm: the scale is (1 + weight), and the product is taken in float32 before the cast back."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__(hidden, eps, 0.0)

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None:
            residual.add_(x)
            x = residual
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)
