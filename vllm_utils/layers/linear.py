"""Linear layers that know how to shard themselves across tensor-parallel ranks and how to load
checkpoint tensors into their (possibly fused) weights."""
import torch
import torch.nn.functional as F
from torch import nn

from vllm_utils.layers.parallel import all_reduce, tp_rank, tp_size


def _divide(a: int, b: int, what: str) -> int:
    if a % b:
        from vllm_utils.errors import UserError

        raise UserError(f"--tensor-parallel-size {b} does not divide {what} ({a}); pick a divisor of {a}")
    return a // b


class LinearBase(nn.Module):
    packed: torch.Tensor | None = None  # the weight in oneDNN's blocked layout (CPU, bf16), once packed

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
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def pack_for_cpu(self) -> None:
        """Reorders the weight once for oneDNN (AMX/AVX-512 kernels); the plain copy is freed."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.data)  # no batch hint: good for all M
        self.weight = None


def _packing_works() -> bool:
    """oneDNN's packed bf16 linear gives F.linear's exact result here (it is a private op: check, don't trust)."""
    try:
        w, x = torch.randn(64, 32, dtype=torch.bfloat16), torch.randn(3, 32, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        return torch.equal(torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), F.linear(x, w))
    except (AttributeError, RuntimeError):
        return False


def pack_linears_for_cpu(model: nn.Module, dtype: torch.dtype) -> int:
    """Packs every linear layer's weight for oneDNN when that is exact (bf16 on a CPU build with oneDNN).
    Returns how many were packed."""
    if dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available() or not _packing_works():
        return 0
    layers = [m for m in model.modules() if isinstance(m, LinearBase)]
    for layer in layers:
        layer.pack_for_cpu()
    return len(layers)


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
