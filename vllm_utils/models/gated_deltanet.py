"""Gated DeltaNet, the linear-attention layer of Qwen3.5 (and of MiniCPM-V 4.6/4.7's decoder): q, k and v from one
projection through a short causal depthwise convolution (SiLU), a decay g and a rate beta per value head, the gated
delta rule (`layers/delta_rule.py`) on the sequence's recurrent state, then an RMSNorm gated by SiLU(z) per value
head. Each sequence's state, its convolution's last inputs and the rule's matrix, lives in a slot of this layer's
pools (`allocate_state`), handed out with the sequence's KV blocks; a prompt's first chunk starts from zeros, later
chunks and decode steps from the slot. Tensor parallelism splits the heads (key heads with their value heads)."""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.attention.metadata import AttentionMetadata
from vllm_utils.distributed import tp_rank, tp_size
from vllm_utils.layers.delta_rule import GatedDeltaRule
from vllm_utils.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear, divide


def _load_rank_slice(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    """This rank's slice of a per-value-head tensor (A_log, dt_bias)."""
    size = param.shape[0]
    param.data.copy_(loaded.narrow(0, tp_rank() * size, size))


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output, scaled by the weight in the model dtype, then gated by SiLU(gate) in float32
    (as transformers' `Qwen3_5RMSNormGated`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return (x * F.silu(gate.float())).to(dtype)


class CausalConv(nn.Module):
    """The depthwise convolution over q, k and v's channels (weight [channels, 1, kernel], as the checkpoint holds
    it), split across ranks as the fused projection before it."""

    def __init__(self, parts: list[int], kernel: int) -> None:
        super().__init__()
        self.parts = parts  # each rank's channels of q, k and v
        self.weight = nn.Parameter(torch.empty(sum(parts), 1, kernel), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        whole = loaded.split([p * tp_size() for p in self.parts])
        param.data.copy_(torch.cat([w.narrow(0, tp_rank() * p, p) for w, p in zip(whole, self.parts)]))


class GatedDeltaNet(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        hidden, tp = config.hidden_size, tp_size()
        self.key_heads = divide(config.linear_num_key_heads, tp, "the linear-attention key heads")
        self.value_heads = divide(config.linear_num_value_heads, tp, "the linear-attention value heads")
        self.key_dim, self.value_dim = config.linear_key_head_dim, config.linear_value_head_dim
        keys, values = self.key_heads * self.key_dim, self.value_heads * self.value_dim
        self.kernel = config.linear_conv_kernel_dim
        self.in_proj_qkv = MergedColumnParallelLinear(hidden, [keys * tp, keys * tp, values * tp])
        self.in_proj_z = ColumnParallelLinear(hidden, values * tp)
        self.in_proj_b = ColumnParallelLinear(hidden, self.value_heads * tp)
        self.in_proj_a = ColumnParallelLinear(hidden, self.value_heads * tp)
        self.conv1d = CausalConv([keys, keys, values], self.kernel)
        self.A_log = nn.Parameter(torch.empty(self.value_heads), requires_grad=False)
        self.dt_bias = nn.Parameter(torch.empty(self.value_heads), requires_grad=False)
        for param in (self.A_log, self.dt_bias):
            param.weight_loader = _load_rank_slice
        self.norm = GatedRMSNorm(self.value_dim, config.rms_norm_eps)
        self.out_proj = RowParallelLinear(values * tp, hidden)
        self.rule = GatedDeltaRule()
        self.splits = [keys, keys, values]
        self.conv_state = torch.empty(0)  # [slots, channels, kernel - 1]: the last inputs of the convolution
        self.recurrent_state = torch.empty(0)  # [slots, value heads, key dim, value dim] float32

    def state_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one sequence's state."""
        conv = sum(self.splits) * (self.kernel - 1) * dtype.itemsize
        return conv + self.value_heads * self.key_dim * self.value_dim * 4

    def allocate_state(self, slots: int, dtype: torch.dtype, device: torch.device) -> None:
        self.conv_state = torch.zeros(slots, sum(self.splits), self.kernel - 1, dtype=dtype, device=device)
        self.recurrent_state = torch.zeros(slots, self.value_heads, self.key_dim, self.value_dim,
                                           dtype=torch.float32, device=device)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, keep: torch.Tensor | None = None) -> torch.Tensor:
        tokens = x.shape[0]
        slots = meta.state_slots
        if meta.is_prefill and meta.fresh_slots is not None:  # prompts starting now start from zeros
            self.conv_state[meta.fresh_slots] = 0
            self.recurrent_state[meta.fresh_slots] = 0
        mixed = self.in_proj_qkv(x)
        mixed = self._conv_prefill(mixed, slots, meta.seq_lens) if meta.is_prefill else self._conv_step(mixed, slots)
        q, k, v = mixed.split(self.splits, dim=-1)
        q, k = q.view(tokens, self.key_heads, self.key_dim), k.view(tokens, self.key_heads, self.key_dim)
        v = v.view(tokens, self.value_heads, self.value_dim)
        beta = self.in_proj_b(x).sigmoid()
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
        out = self.rule(q, k, v, g, beta, self.recurrent_state, slots, meta.seq_lens if meta.is_prefill else None)
        z = self.in_proj_z(x).view(tokens, self.value_heads, self.value_dim)
        out = self.norm(out, z).reshape(tokens, -1)
        return self.out_proj(out if keep is None else out[keep])

    def _conv_prefill(self, x: torch.Tensor, slots: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """Each sequence's tokens after its slot's last inputs; the slot keeps the new last ones."""
        weight, outs, start = self.conv1d.weight, [], 0
        for slot, n in zip(slots.tolist(), seq_lens):
            inputs = torch.cat([self.conv_state[slot], x[start : start + n].T], dim=1)  # [channels, kernel-1+n]
            self.conv_state[slot] = inputs[:, inputs.shape[1] - (self.kernel - 1):]
            outs.append(F.conv1d(inputs[None], weight, groups=weight.shape[0])[0].T)
            start += n
        return F.silu(torch.cat(outs))

    def _conv_step(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One token of each sequence."""
        inputs = torch.cat([self.conv_state[slots], x[:, :, None]], dim=2)  # [seqs, channels, kernel]
        self.conv_state[slots] = inputs[:, :, 1:]
        weight = self.conv1d.weight
        return F.silu(F.conv1d(inputs, weight, groups=weight.shape[0])[:, :, 0])
