"""The Llama-style decoder (the language model of LLaVA), read top to bottom: fused QKV and gate/up projections,
grouped-query attention, tensor-parallel linears. Mistral, Qwen2, Qwen3, Gemma and Phi-3 are this decoder with the
switches of their `DecoderSpec` (biases, norm form, embedding scale, sliding windows, per-head q/k norms)."""
import torch
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.attention.layer import PagedAttention
from vllm_utils.attention.metadata import AttentionMetadata
from vllm_utils.layers.activation import ActAndMul
from vllm_utils.layers.embedding import ParallelLMHead, VocabParallelEmbedding, embed_with_mm
from vllm_utils.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm_utils.layers.norm import GemmaRMSNorm, RMSNorm
from vllm_utils.layers.rotary import MRotaryEmbedding, RotaryEmbedding
from vllm_utils.models.text_backbones import DecoderSpec, decoder_spec


# checkpoint projection name -> (our fused parameter, shard): what a model holding this decoder loads
PACKED_MODULES = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def make_norm(config: PretrainedConfig, spec: DecoderSpec) -> nn.Module:
    return (GemmaRMSNorm if spec.gemma_norm else RMSNorm)(config.hidden_size, config.rms_norm_eps)


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, spec: DecoderSpec, rotary: RotaryEmbedding,
                 sliding_window: int | None) -> None:
        super().__init__()
        head_dim = spec.head_dim
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads, num_kv_heads,
                                          spec.qkv_bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, spec.o_bias)
        self.q_size = self.qkv_proj.num_heads * head_dim
        self.kv_size = self.qkv_proj.num_kv_heads * head_dim
        self.head_dim = head_dim
        if spec.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.attn = PagedAttention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim, head_dim**-0.5,
                                   rotary, sliding_window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if hasattr(self, "q_norm"):  # per head, before RoPE
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        out = self.attn(positions, q, k, v, meta)
        return self.o_proj(out if keep is None else out[keep])


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, spec: DecoderSpec) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2,
                                                       spec.mlp_bias)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, spec.mlp_bias)
        self.act = ActAndMul(spec.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, spec: DecoderSpec, rotary: RotaryEmbedding,
                 sliding_window: int | None) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config, spec)
        self.self_attn = LlamaAttention(config, spec, rotary, sliding_window)
        self.post_attention_layernorm = make_norm(config, spec)
        self.mlp = LlamaMLP(config, spec)

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
        spec = decoder_spec(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, spec.embed_scale)
        if spec.mrope_sections:
            rotary = MRotaryEmbedding(spec.head_dim, config.max_position_embeddings, spec.rope, list(spec.mrope_sections))
        else:
            rotary = RotaryEmbedding(spec.head_dim, config.max_position_embeddings, spec.rope)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, spec, rotary, window) for window in spec.sliding_windows)
        self.norm = make_norm(config, spec)

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, meta: AttentionMetadata,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states of every row, or of the rows `keep` (a prefill needs only each prompt's last:
        the last layer then runs its output projection and MLP on those alone)."""
        x, residual = embeds, None
        for i, layer in enumerate(self.layers):
            x, residual = layer(positions, x, residual, meta, keep if i == len(self.layers) - 1 else None)
        return self.norm(x, residual)


class MultimodalDecoderLM(nn.Module):
    """What every family shares around its decoder (`language_model`, `lm_head`): token embeddings with the
    multimodal rows in place, the decoder, the logits."""

    language_model: LlamaModel
    lm_head: ParallelLMHead

    @classmethod
    def tensor_parallel_widths(cls, config: PretrainedConfig) -> dict[str, int]:
        """The decoder's widths that --tensor-parallel-size must divide (a family adds its tower's)."""
        text = config.text_config
        return {"the attention heads": text.num_attention_heads,
                "the key/value heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                "the MLP width": text.intermediate_size}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                mm_embeds: torch.Tensor | None = None, mm_mask: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states of every token, or of the rows `keep` only."""
        embeds = embed_with_mm(self.language_model.embed_tokens, input_ids, mm_embeds, mm_mask)
        return self.language_model(positions, embeds, meta, keep)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
