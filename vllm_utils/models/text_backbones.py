"""The language models LLaVA-style checkpoints use (Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3) are one Llama-style decoder
with a few switches. `decoder_spec` reads them from a text config of a supported type, and refuses by name every
value that would change the math and that the decoder does not implement (checked against transformers'
modeling code for each type)."""
from dataclasses import dataclass

from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.layers.activation import check_activation
from vllm_utils.layers.rotary import SUPPORTED_ROPE_TYPES, rope_parameters

SUPPORTED_TEXT_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "qwen2_vl_text", "qwen2_5_vl_text")
_QK_NORM_TYPES = ("qwen3",)  # an RMSNorm over each head's query and key, before RoPE
_QWEN2_TYPES = ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text")  # biases on q, k and v only
_MROPE_TYPES = ("qwen2_vl_text", "qwen2_5_vl_text")  # multimodal RoPE, on every config of these types
# fields some related types carry that change the math, refused wherever they are set
_UNSUPPORTED_FIELDS = ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                       "quantization_config", "use_qk_norm", "embedding_multiplier", "logits_scaling")


@dataclass(frozen=True)
class DecoderSpec:
    model_type: str
    hidden_act: str
    head_dim: int
    qkv_bias: bool  # biases of the q, k and v projections
    o_bias: bool
    mlp_bias: bool
    gemma_norm: bool  # RMSNorm scales by (1 + weight), in float32
    embed_scale: float | None  # embeddings multiplied by this (Gemma: sqrt(hidden))
    sliding_windows: tuple[int | None, ...]  # per layer: keys within this many positions, or None (all)
    rope: dict
    mrope_sections: tuple[int, ...] | None = None  # multimodal RoPE: frequencies per position row (time, h, w)
    qk_norm: bool = False  # RMSNorm over each head of q and of k (Qwen3)


def refuse(field: str, value: object, supported: str) -> UserError:
    return UserError(f"text_config.{field} = {value!r} is not supported ({supported}); this checkpoint would "
                     f"run differently from transformers' model")


def _sliding_windows(text: PretrainedConfig) -> tuple[int | None, ...]:
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if text.model_type in _QWEN2_TYPES or layer_types is not None:
        layer_types = layer_types or ["full_attention"] * text.num_hidden_layers
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise refuse("layer_types", sorted(unknown)[0], "supported: full_attention, sliding_attention")
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    if text.model_type in ("mistral", "phi3"):
        return (window,) * text.num_hidden_layers
    return (None,) * text.num_hidden_layers


def decoder_spec(text: PretrainedConfig) -> DecoderSpec:
    kind = getattr(text, "model_type", None)
    if kind not in SUPPORTED_TEXT_TYPES:
        raise UserError(f"text_config.model_type '{kind}' is not supported (supported: "
                        f"{', '.join(SUPPORTED_TEXT_TYPES)})")
    for field in _UNSUPPORTED_FIELDS:
        if getattr(text, field, None) not in (None, False):
            raise refuse(field, getattr(text, field), "not implemented")
    if getattr(text, "use_bidirectional_attention", None):
        raise refuse("use_bidirectional_attention", True, "only causal attention")
    rope = rope_parameters(text)
    sections = None
    if kind in _MROPE_TYPES:  # transformers' Qwen2-VL rotates by these sections whatever the config says
        sections = tuple(rope.pop("mrope_section", None) or (16, 24, 24))
        rope.pop("type", None)
        if rope.get("rope_type") == "mrope":
            rope["rope_type"] = "default"
    if rope.get("rope_type", "default") not in SUPPORTED_ROPE_TYPES:
        raise refuse("rope_parameters.rope_type", rope.get("rope_type"), f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    partial = rope.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise refuse("partial_rotary_factor", partial, "only 1.0: RoPE on the whole head")
    check_activation(text.hidden_act, "text_config.hidden_act")
    attention_bias = bool(getattr(text, "attention_bias", False))
    return DecoderSpec(
        model_type=kind,
        hidden_act=text.hidden_act,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        qkv_bias=kind in _QWEN2_TYPES or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(getattr(text, "mlp_bias", False)),
        gemma_norm=kind == "gemma",
        embed_scale=text.hidden_size**0.5 if kind == "gemma" else None,
        sliding_windows=_sliding_windows(text),
        rope=rope,
        mrope_sections=sections,
        qk_norm=kind in _QK_NORM_TYPES,
    )
