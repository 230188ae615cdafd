"""Linear layers that know how to shard themselves across tensor-parallel ranks and how to load
checkpoint tensors into their (possibly fused) weights."""
import torch
import torch.nn.functional as F
from torch import nn

from vllm_utils.layers import cpu_kernels, triton_gemv
from vllm_utils.layers.parallel import all_reduce, tp_rank, tp_size


def _divide(a: int, b: int, what: str) -> int:
    if a % b:
        from vllm_utils.errors import UserError

        raise UserError(f"--tensor-parallel-size {b} does not divide {what} ({a}); pick a divisor of {a}")
    return a // b


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: nn.Module) -> torch.Tensor:
    """F.linear, except that decode-sized inputs go to our CPU kernel where it was enabled for this layer (or,
    on CUDA, single rows to the Triton GEMV where VLLM_UTILS_TRITON_GEMV=1 asks for it), and
    that large bf16 CPU inputs are padded to a multiple of 4 rows: oneDNN runs a 577-row product (a CLIP image)
    ~15% slower than a 580-row one on Zen 4, a tail of 1-2 rows being slow; the copy costs ~2% of that."""
    rows = x.numel() // x.shape[-1]
    if layer.packed_weight is not None:
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, -1), layer.packed_weight, bias, "none", [], "")
        return out.view(*x.shape[:-1], -1)
    if layer.use_cpu_gemv and rows <= cpu_kernels.MAX_ROWS:
        return cpu_kernels.linear(x, weight, bias, layer.next_weight)
    if triton_gemv.supports(x, weight):
        return triton_gemv.gemv(x, weight, bias)
    if rows > 64 and rows % 4 in (1, 2) and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        padded = F.pad(x.reshape(rows, -1), (0, 0, 0, 4 - rows % 4))
        return F.linear(padded, weight, bias)[:rows].view(*x.shape[:-1], -1)
    return F.linear(x, weight, bias)


def enable_cpu_gemv(model: nn.Module) -> int:
    """Turns on the CPU decode kernel in every layer that has the switch and whose weight it supports, and
    tells each the weight of the layer after it (in module order, which is the decode order for our models),
    so the kernel can read the start of it into cache. Returns how many layers use it."""
    layers = [m for m in model.modules() if hasattr(m, "use_cpu_gemv") and cpu_kernels.supports(m.weight)]
    for layer, after in zip(layers, layers[1:] + [None]):
        layer.use_cpu_gemv = True
        layer.next_weight = None if after is None else after.weight.data  # a plain tensor, not a parameter
    return len(layers)


def pack_for_onednn(module: nn.Module, rows: int) -> int:
    """Replaces the weight of every bf16 CPU linear in `module` by oneDNN's packed layout for products of about
    `rows` input rows. For modules that only ever see whole prompts (the vision tower: 577-row products run ~5%
    faster than on plain weights, ~20% faster than unpadded), as no decode kernel needs the plain weight then.
    Returns how many layers were packed (0 where this PyTorch has no oneDNN)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return 0
    layers = [m for m in module.modules() if isinstance(m, LinearBase)
              and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"]
    for layer in layers:
        layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.data, rows)
        layer.weight.data = torch.empty(0, dtype=torch.bfloat16)  # the plain copy is never read again
    return len(layers)


class LinearBase(nn.Module):
    use_cpu_gemv = False  # set by enable_cpu_gemv, with next_weight
    next_weight: torch.Tensor | None = None
    packed_weight: torch.Tensor | None = None  # set by pack_for_onednn, which empties `weight`

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        param.data.copy_(loaded)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return dense(x, self.weight, bias, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank keeps its slice of the result."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, _divide(out_features, tp_size(), "the output features"), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        size = param.shape[0]
        param.data.copy_(loaded.narrow(0, tp_rank() * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input fused into one matmul (gate_up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        assert isinstance(shard_id, int)
        shard = self.out_sizes[shard_id] // tp_size()
        offset = sum(self.out_sizes[:shard_id]) // tp_size()
        param.data.narrow(0, offset, shard).copy_(loaded.narrow(0, tp_rank() * shard, shard))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; heads split across ranks."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size(), "the attention heads")
        self.num_kv_heads = _divide(num_kv_heads, tp_size(), "the key/value heads")
        out = (num_heads + 2 * num_kv_heads) * head_dim
        super().__init__(hidden, out, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, tp_rank() * size, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial products summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(_divide(in_features, tp_size(), "the input features"), out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:  # the bias is added once, after the reduction
            param.data.copy_(loaded)
            return
        size = param.shape[1]
        param.data.copy_(loaded.narrow(1, tp_rank() * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.matmul(x, self.bias if tp_rank() == 0 else None))
