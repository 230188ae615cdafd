"""Mixture of Experts: a softmax top-k router and a bank of gated experts whose weights are stored fused
(`w13` [experts, 2 * intermediate, hidden]: gate rows then up rows; `w2` [experts, hidden, intermediate]).
Tensor parallelism splits every expert's intermediate width across ranks (gate/up as a column-parallel linear,
down as a row-parallel one) and sums the partial outputs with one all-reduce after the experts. The native form
runs each chosen expert on the tokens that chose it and touches no other expert's weights."""
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vllm_utils.distributed import all_reduce, tp_rank, tp_size
from vllm_utils.errors import UserError
from vllm_utils.layers.activation import ACTIVATIONS, check_activation
from vllm_utils.layers.linear import LinearBase, divide
from vllm_utils.layers.op import Op


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [tokens, experts] -> (weights [tokens, top_k] in the logits' dtype, expert ids
    [tokens, top_k]): softmax in float32, the top k, rescaled to sum to one when `renormalize` (transformers'
    order of operations, so that ties and roundings fall alike)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


class ExpertWeights(nn.Module):
    """One fused tensor of every expert (`weight`), in a module of its own so that the loader tracks the shards
    (an expert's gate, up or down) it is filled from."""

    def __init__(self, shape: tuple[int, ...], loader) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.weight.weight_loader = loader


class FusedMoE(Op):
    """The experts of one layer: `forward_native(x, weights, ids)` -> this rank's partial output [tokens, hidden]
    (before the all-reduce; `forward` reduces). Shards the loader hands the weight loaders: None for fused
    tensors of all experts, (expert, 0 gate | 1 up) for `w13` and expert for `w2` from per-expert ones."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, hidden_act: str) -> None:
        super().__init__()
        self.num_experts, self.hidden = num_experts, hidden
        self.full_intermediate = intermediate
        self.intermediate = divide(intermediate, tp_size(), "the experts' intermediate width")
        self.act = check_activation(hidden_act)
        self.w13 = ExpertWeights((num_experts, 2 * self.intermediate, hidden), self.load_w13)
        self.w2 = ExpertWeights((num_experts, hidden, self.intermediate), self.load_w2)

    def _as_ours(self, loaded: torch.Tensor, shape: tuple[int, int, int], name: str) -> torch.Tensor:
        """All experts' tensor as we hold it (before the split): transformers writes it so, the hub's
        Qwen3-VL-MoE files hold each expert transposed; as transformers' loader, a tensor already of our shape
        is taken as it is (a square expert is never transposed)."""
        if tuple(loaded.shape) == shape:
            return loaded
        if tuple(loaded.shape) == (shape[0], shape[2], shape[1]):
            return loaded.transpose(1, 2)
        raise UserError(f"the checkpoint's experts' {name} {tuple(loaded.shape)} is neither {shape} nor its "
                        f"transpose: the folder holds another model, or the config's expert sizes are wrong")

    def load_w13(self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int, int] | None = None) -> None:
        size, rank = self.intermediate, tp_rank()
        if shard is None:  # all experts, gate then up along the fused width
            full = self._as_ours(loaded, (self.num_experts, 2 * self.full_intermediate, self.hidden), "gate_up_proj")
            for part, half in enumerate(full.split(self.full_intermediate, dim=1)):
                param.data[:, part * size:(part + 1) * size].copy_(half.narrow(1, rank * size, size))
            return
        expert, part = shard
        param.data[expert, part * size:(part + 1) * size].copy_(loaded.narrow(0, rank * size, size))

    def load_w2(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        size, rank = self.intermediate, tp_rank()
        if shard is None:
            full = self._as_ours(loaded, (self.num_experts, self.hidden, self.full_intermediate), "down_proj")
            param.data.copy_(full.narrow(2, rank * size, size))
            return
        param.data[shard].copy_(loaded.narrow(1, rank * size, size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.run(x, weights, ids))

    def forward_native(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each chosen expert on the rows that chose it, scaled by their weights and summed in place (in the
        order of the experts, as transformers sums them). Reads only the chosen experts' weights; under CUDA-graph
        capture, where the host cannot learn which experts were chosen, every expert on every row instead."""
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return self.forward_dense(x, weights, ids)
        return self.forward_sparse(x, weights, ids, self.expert)

    def forward_sparse(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                       expert_fn: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        """The native form's loop over the chosen experts, each run by `expert_fn(rows, expert)` (a device's
        implementation may give its own products)."""
        out = torch.zeros_like(x)
        top_k = ids.shape[1]
        order = ids.flatten().argsort(stable=True)  # (token, slot) pairs grouped by expert, tokens in order
        counts = torch.bincount(ids.flatten(), minlength=self.num_experts).tolist()
        flat_weights = weights.flatten()
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            chosen = order[start:start + count]
            start += count
            rows = chosen // top_k
            y = expert_fn(x[rows], expert) * flat_weights[chosen, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return out

    def expert(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        gate, up = F.linear(x, self.w13.weight[expert]).chunk(2, dim=-1)
        return F.linear(ACTIVATIONS[self.act](gate) * up, self.w2.weight[expert])

    def forward_dense(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Every expert on every row, weighted by the routing (zero where not chosen): no host synchronisation."""
        dense = torch.zeros(x.shape[0], self.num_experts, dtype=weights.dtype, device=x.device)
        dense.scatter_(1, ids, weights)
        out = torch.zeros_like(x)
        for expert in range(self.num_experts):
            out += (self.expert(x, expert) * dense[:, expert, None]).to(out.dtype)
        return out


class SparseMoeBlock(nn.Module):
    """Router (`gate`, replicated on every rank) then experts: Qwen3-MoE's sparse block."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int, hidden_act: str,
                 renormalize: bool) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = LinearBase(hidden, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, hidden, intermediate, hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        return self.experts(x, weights, ids)
