"""The linear products of bf16 layers on CPUs, as implementations the platform gives linear layers after loading.
Each is called as `impl(x, bias)` and owns its weight's form."""
import torch
import torch.nn.functional as F

from vllm_utils.kernels import cpu


def can_pack_for_onednn() -> bool:
    """oneDNN packs bf16 weights only on CPUs with its bf16 paths (AVX-512 BW/VL/DQ, or AVX-NE-CONVERT)."""
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_is_mkldnn_bf16_supported") and bool(mkldnn._is_mkldnn_bf16_supported()))


class OneDnnLinear:
    """F.linear (oneDNN), with large inputs padded to a multiple of 4 rows: oneDNN runs a product whose row
    count leaves a tail of 1-2 rows markedly slower than the padded one, which costs only a copy."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > 64 and rows % 4 in (1, 2):
            padded = F.pad(x.reshape(rows, -1), (0, 0, 0, 4 - rows % 4))
            return F.linear(padded, self.weight, bias)[:rows].view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, bias)


class DecodeLinear(OneDnnLinear):
    """Up to `cpu.max_rows()` input rows (a decode step) through our C kernel, which streams the weight at memory
    bandwidth and then reads the start of `next_weight` (the next decode linear's) into cache; larger inputs
    through oneDNN. `cpu.supports(weight)` must hold."""

    def __init__(self, weight: torch.Tensor, next_weight: torch.Tensor | None) -> None:
        super().__init__(weight)
        self.next_weight = next_weight
        self.max_rows = cpu.max_rows()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= self.max_rows:
            return cpu.linear(x, self.weight, bias, self.next_weight)
        return super().__call__(x, bias)


class PackedOneDnnLinear:
    """The weight in oneDNN's packed layout for products of about `rows` input rows, for layers that only ever
    see whole prompts (a vision tower), where no decode kernel needs the plain weight. The plain copy is
    dropped from the layer (`layer_weight` is emptied): one copy in memory."""

    def __init__(self, layer_weight: torch.nn.Parameter, rows: int) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(layer_weight.data, rows)
        layer_weight.data = torch.empty(0, dtype=layer_weight.dtype)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, -1), self.packed, bias, "none", [], "")
        return out.view(*x.shape[:-1], -1)
