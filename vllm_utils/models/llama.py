"""Llama decoder (the language model of LLaVA), read top to bottom. Fused QKV and gate/up projections;
grouped-query attention; tensor-parallel linears."""
import torch
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.attention.layer import PagedAttention
from vllm_utils.attention.metadata import AttentionMetadata
from vllm_utils.layers.activation import SiluAndMul
from vllm_utils.layers.embedding import VocabParallelEmbedding
from vllm_utils.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm_utils.layers.norm import RMSNorm
from vllm_utils.layers.rotary import RotaryEmbedding, rope_parameters


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        head_dim = head_dim_of(config)
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads, num_kv_heads, bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, bias)
        self.q_size = self.qkv_proj.num_heads * head_dim
        self.kv_size = self.qkv_proj.num_kv_heads * head_dim
        self.attn = PagedAttention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim, head_dim**-0.5,
                                   rotary)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        out = self.attn(positions, q, k, v, meta)
        return self.o_proj(out if keep is None else out[keep])


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it is added), for the rows `keep`
        only where given (all rows still write their K/V)."""
        if residual is None:
            residual = x  # the embeddings, which nothing else reads: later layers add into it in place
            x = self.input_layernorm(x)
        else:
            x = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta, keep)
        if keep is not None:
            residual = residual[keep]
        x = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary = RotaryEmbedding(head_dim_of(config), config.max_position_embeddings, rope_parameters(config))
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, rotary) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, meta: AttentionMetadata,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states of every row, or of the rows `keep` (a prefill needs only each prompt's last:
        the last layer then runs its output projection and MLP on those alone, ~5% of a prefill's work)."""
        x, residual = embeds, None
        for i, layer in enumerate(self.layers):
            x, residual = layer(positions, x, residual, meta, keep if i == len(self.layers) - 1 else None)
        return self.norm(x, residual)
