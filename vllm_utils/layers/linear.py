"""Linear layers that know how to shard themselves across tensor-parallel ranks and how to load checkpoint
tensors into their (possibly fused) weights. Their product is `F.linear` unless the platform gave them a device
implementation after loading."""
import torch
import torch.nn.functional as F
from torch import nn

from vllm_utils.errors import UserError
from vllm_utils.layers.op import Op
from vllm_utils.distributed import all_reduce, tp_rank, tp_size


def divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise UserError(f"--tensor-parallel-size {b} does not divide {what} ({a}); pick a divisor of {a}")
    return a // b


class LinearOp(Op):
    """A layer whose work is `x @ weight.T (+ bias)`: what a device's linear implementation replaces."""

    weight: nn.Parameter

    def forward_native(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)


class LinearBase(LinearOp):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank keeps its slice of the result."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, divide(out_features, tp_size(), "the output features"), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        size = param.shape[0]
        param.data.copy_(loaded.narrow(0, tp_rank() * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input fused into one matmul (gate_up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """One projection's tensor (`shard_id` its index), or all of them fused as the checkpoint holds them."""
        if shard_id is None:
            for index, part in enumerate(loaded.split(self.out_sizes)):
                self.weight_loader(param, part, index)
            return
        shard = self.out_sizes[shard_id] // tp_size()
        offset = sum(self.out_sizes[:shard_id]) // tp_size()
        param.data.narrow(0, offset, shard).copy_(loaded.narrow(0, tp_rank() * shard, shard))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; heads split across ranks."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp_size(), "the attention heads")
        self.num_kv_heads = divide(num_kv_heads, tp_size(), "the key/value heads")
        out = (num_heads + 2 * num_kv_heads) * head_dim
        super().__init__(hidden, out, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """The q, k or v tensor (`shard_id`), or all three fused as the checkpoint holds them."""
        if shard_id is None:
            q_all, kv_all = self.num_heads * tp_size() * self.head_dim, self.num_kv_heads * tp_size() * self.head_dim
            for name, part in zip("qkv", loaded.split([q_all, kv_all, kv_all])):
                self.weight_loader(param, part, name)
            return
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, tp_rank() * size, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial products summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(divide(in_features, tp_size(), "the input features"), out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:  # the bias is added once, after the reduction
            param.data.copy_(loaded)
            return
        size = param.shape[1]
        param.data.copy_(loaded.narrow(1, tp_rank() * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.run(x, self.bias if tp_rank() == 0 else None))
