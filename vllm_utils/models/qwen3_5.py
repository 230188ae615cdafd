"""Qwen3.5 (HF `Qwen3_5ForConditionalGeneration`, e.g. Qwen/Qwen3.5-27B): Qwen3-VL's vision tower without DeepStack
and its frame-by-frame multimodal positions, on a hybrid decoder. Its `layer_types` interleave Gated DeltaNet layers
(linear attention with a recurrent state per sequence, `gated_deltanet.py`) with gated full-attention layers: q/k
RMSNorm per head, RoPE on the first `partial_rotary_factor` of each head (interleaved multimodal rows), and the
attention output multiplied by sigmoid of a gate the q projection also yields. Norms scale by (1 + weight)."""
import torch
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.attention.layer import PagedAttention
from vllm_utils.attention.metadata import AttentionMetadata
from vllm_utils.errors import UserError
from vllm_utils.layers.activation import check_activation
from vllm_utils.layers.embedding import VocabParallelEmbedding
from vllm_utils.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm_utils.layers.norm import GemmaRMSNorm
from vllm_utils.layers.rotary import rope_parameters
from vllm_utils.models.gated_deltanet import GatedDeltaNet
from vllm_utils.models.llama import LlamaMLP
from vllm_utils.models.qwen3_vl import InterleavedMRotaryEmbedding, Qwen3VLForConditionalGeneration
from vllm_utils.models.text_backbones import DecoderSpec, refuse

_LAYER_TYPES = ("linear_attention", "full_attention")
_DEFAULT_MROPE_SECTION = [11, 11, 10]  # transformers' default where the config names none


def text_spec(text: PretrainedConfig) -> tuple[DecoderSpec, int]:
    """The decoder's switches and the number of rotated channels of a head; refuses, by name, every setting the
    decoder does not implement."""
    if text.model_type != "qwen3_5_text":
        raise UserError(f"text_config.model_type '{text.model_type}' is not supported (supported: qwen3_5_text)")
    unknown = sorted(set(text.layer_types) - set(_LAYER_TYPES))
    if unknown or len(text.layer_types) != text.num_hidden_layers:
        raise refuse("layer_types", text.layer_types, f"one of {', '.join(_LAYER_TYPES)} per layer")
    if "full_attention" not in text.layer_types:
        raise refuse("layer_types", text.layer_types, "at least one full_attention layer")
    rope = rope_parameters(text)
    if rope.get("rope_type", "default") != "default":
        raise refuse("rope_parameters.rope_type", rope.get("rope_type"), "supported: default")
    sections = list(rope.pop("mrope_section", None) or _DEFAULT_MROPE_SECTION)
    rope.pop("mrope_interleaved", None)  # transformers interleaves whatever it says
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rotated = int(head_dim * rope.pop("partial_rotary_factor", 1.0))
    if len(sections) != 3 or sum(sections) != rotated // 2 or rotated % 2:
        raise refuse("rope_parameters.mrope_section", sections,
                     f"three sections summing to half the {rotated} rotated channels of a head")
    check_activation(text.hidden_act, "text_config.hidden_act")
    if getattr(text, "attention_bias", False):
        raise refuse("attention_bias", True, "Qwen3.5's projections have no biases")
    if getattr(text, "attn_output_gate", True) is not True:
        raise refuse("attn_output_gate", text.attn_output_gate, "only true: the gated attention")
    if getattr(text, "mamba_ssm_dtype", "float32") != "float32":
        raise refuse("mamba_ssm_dtype", text.mamba_ssm_dtype, "only float32: the recurrent state's dtype")
    if text.linear_num_value_heads % text.linear_num_key_heads:
        raise refuse("linear_num_value_heads", text.linear_num_value_heads,
                      f"a multiple of linear_num_key_heads ({text.linear_num_key_heads})")
    spec = DecoderSpec(model_type=text.model_type, hidden_act=text.hidden_act, head_dim=head_dim, qkv_bias=False,
                       o_bias=False, mlp_bias=False, gemma_norm=True, embed_scale=None,
                       sliding_windows=(None,) * text.num_hidden_layers, rope=rope, mrope_sections=tuple(sections),
                       qk_norm=True)
    return spec, rotated


class GatedAttention(nn.Module):
    """Full attention whose q projection yields, per head, the query then a gate on the head's output."""

    def __init__(self, config: PretrainedConfig, spec: DecoderSpec, rotary: InterleavedMRotaryEmbedding,
                 rotated: int) -> None:
        super().__init__()
        head_dim = self.head_dim = spec.head_dim
        # q's rows are (query, gate) per head: split across ranks as twice the heads of head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, 2 * config.num_attention_heads,
                                          config.num_key_value_heads)
        self.heads, self.kv_heads = self.qkv_proj.num_heads // 2, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size)
        self.q_norm = GemmaRMSNorm(head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(head_dim, config.rms_norm_eps)
        self.rotary, self.rotated = rotary, rotated
        self.attn = PagedAttention(self.heads, self.kv_heads, head_dim, head_dim**-0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        tokens = x.shape[0]
        query_gate, k, v = self.qkv_proj(x).split([2 * self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                                   self.kv_heads * self.head_dim], dim=-1)
        query_gate = query_gate.view(tokens, self.heads, 2 * self.head_dim)
        q, gate = query_gate[..., : self.head_dim], query_gate[..., self.head_dim :]
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(tokens, self.heads, self.head_dim)
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(tokens, self.kv_heads, self.head_dim)
        rot = self.rotated
        q_rot, k_rot = self.rotary(positions, q[..., :rot].contiguous(), k[..., :rot].contiguous())
        q, k = torch.cat([q_rot, q[..., rot:]], dim=-1), torch.cat([k_rot, k[..., rot:]], dim=-1)
        out = self.attn(positions, q.reshape(tokens, -1), k.reshape(tokens, -1), v, meta)
        out = out * torch.sigmoid(gate.reshape(tokens, -1))
        return self.o_proj(out if keep is None else out[keep])


class Qwen3_5DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, spec: DecoderSpec, kind: str, rotary: InterleavedMRotaryEmbedding,
                 rotated: int) -> None:
        super().__init__()
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        if kind == "linear_attention":
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = GatedAttention(config, spec, rotary, rotated)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = self.make_mlp(config, spec)

    @staticmethod
    def make_mlp(config: PretrainedConfig, spec: DecoderSpec) -> nn.Module:
        """The layer's MLP (a subclass gives experts)."""
        return LlamaMLP(config, spec)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As LlamaDecoderLayer's: (the MLP output, the residual stream before it is added)."""
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x = self.input_layernorm(x, residual)
        if hasattr(self, "linear_attn"):
            x = self.linear_attn(x, meta, keep)
        else:
            x = self.self_attn(positions, x, meta, keep)
        if keep is not None:
            residual = residual[keep]
        x = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Qwen3_5TextModel(nn.Module):
    layer_class: type[Qwen3_5DecoderLayer] = Qwen3_5DecoderLayer
    config_spec = staticmethod(text_spec)  # the text config -> (its switches, rotated channels), refusing by name

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        spec, rotated = self.config_spec(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary = InterleavedMRotaryEmbedding(rotated, config.max_position_embeddings, spec.rope,
                                             list(spec.mrope_sections))
        self.layers = nn.ModuleList(self.layer_class(config, spec, kind, rotary, rotated)
                                    for kind in config.layer_types)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, meta: AttentionMetadata,
                deepstack: list[torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        """`deepstack` is empty: Qwen3.5's tower has none."""
        x, residual = embeds, None
        for i, layer in enumerate(self.layers):
            x, residual = layer(positions, x, residual, meta, keep if i == len(self.layers) - 1 else None)
        return self.norm(x, residual)


class Qwen3_5ForConditionalGeneration(Qwen3VLForConditionalGeneration):
    text_model = Qwen3_5TextModel

    @staticmethod
    def check_text_config(text: PretrainedConfig) -> None:
        text_spec(text)

    @classmethod
    def tensor_parallel_widths(cls, config: PretrainedConfig) -> dict[str, int]:
        text = config.text_config
        return {**super().tensor_parallel_widths(config),
                "the linear-attention key heads": text.linear_num_key_heads,
                "the linear-attention value heads": text.linear_num_value_heads}

    def checkpoint_key(self, key: str) -> str | None:
        """Qwen3-VL's key layout; the multi-token-prediction head (`mtp.*`) is not used."""
        if key.startswith("mtp."):
            return None
        return super().checkpoint_key(key)
