"""Gemma 3's decoder: local (sliding-window) and global layers as `layer_types` lists them, each kind with its own RoPE
(local: `rope_local_base_freq`, unscaled; global: `rope_theta` with the config's scaling, transformers 5 keeping both
in `rope_parameters` per layer type), an RMSNorm over each head's query and key before RoPE, four norms a layer
(before and after attention, before and after the MLP), attention scaled by `query_pre_attn_scalar ** -0.5`, a
GELU-tanh gated MLP, embeddings scaled by sqrt(hidden) in the model dtype. Every norm is Gemma's (1 + weight)."""
import torch
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.attention.layer import PagedAttention
from vllm_utils.attention.metadata import AttentionMetadata
from vllm_utils.errors import UserError
from vllm_utils.layers.activation import ActAndMul, check_activation
from vllm_utils.layers.embedding import VocabParallelEmbedding
from vllm_utils.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm_utils.layers.norm import GemmaRMSNorm
from vllm_utils.layers.rotary import SUPPORTED_ROPE_TYPES, RotaryEmbedding

LAYER_TYPES = ("sliding_attention", "full_attention")
# what transformers' Gemma 3 applies when a layer type's RoPE is not given: the global base and the local one
_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def _refuse(field: str, value: object, supported: str) -> UserError:
    return UserError(f"text_config.{field} = {value!r} is not supported ({supported}); this checkpoint would run "
                     f"differently from transformers' model")


def layer_types(text: PretrainedConfig) -> list[str]:
    """Each layer's kind: the config's `layer_types`, else every `sliding_window_pattern`-th layer global (6 where
    neither is given, as transformers derives it)."""
    kinds = getattr(text, "layer_types", None)
    if kinds is None:
        pattern = getattr(text, "sliding_window_pattern", None) or getattr(text, "_sliding_window_pattern", 6)
        kinds = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(text.num_hidden_layers)]
    kinds = list(kinds)
    unknown = sorted(set(kinds) - set(LAYER_TYPES))
    if unknown:
        raise _refuse("layer_types", unknown[0], "supported: sliding_attention, full_attention")
    if len(kinds) != text.num_hidden_layers:
        raise _refuse("layer_types", f"{len(kinds)} entries", f"one per layer: {text.num_hidden_layers}")
    return kinds


def rope_by_layer_type(text: PretrainedConfig) -> dict[str, dict]:
    """Each layer type's RoPE parameters, from transformers 5's per-type `rope_parameters` or the older fields
    (`rope_theta` with `rope_scaling` for global layers, `rope_local_base_freq` for local ones)."""
    params = dict(getattr(text, "rope_parameters", None) or {})
    if params and not all(isinstance(params.get(kind), dict) for kind in LAYER_TYPES):
        raise _refuse("rope_parameters", params, "one entry per layer type: sliding_attention, full_attention")
    if not params:
        scaling = dict(getattr(text, "rope_scaling", None) or {})
        scaling.setdefault("rope_type", scaling.pop("type", "default"))
        global_theta = getattr(text, "rope_theta", None) or _DEFAULT_THETA["full_attention"]
        local_theta = getattr(text, "rope_local_base_freq", None) or _DEFAULT_THETA["sliding_attention"]
        params = {"full_attention": {**scaling, "rope_theta": global_theta},
                  "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}}
    out = {}
    for kind in LAYER_TYPES:
        rope = dict(params[kind])
        rope_type = rope.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise _refuse(f"rope_parameters.{kind}.rope_type", rope_type,
                          f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if rope.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
            raise _refuse(f"rope_parameters.{kind}.partial_rotary_factor", rope["partial_rotary_factor"],
                          "only 1.0: RoPE on the whole head")
        out[kind] = rope
    return out


def check_gemma3_text(text: PretrainedConfig) -> None:
    """Refuses, by name, every value of a Gemma 3 text config the decoder does not implement."""
    if getattr(text, "model_type", None) != "gemma3_text":
        raise UserError(f"text_config.model_type '{getattr(text, 'model_type', None)}' is not supported "
                        f"(supported: gemma3_text)")
    for field in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(text, field, None) is not None:
            raise _refuse(field, getattr(text, field), "only null: no tanh soft-capping is implemented")
    if getattr(text, "use_bidirectional_attention", None):
        raise _refuse("use_bidirectional_attention", True, "only causal attention over text")
    check_activation(text.hidden_activation, "text_config.hidden_activation")
    if "sliding_attention" in layer_types(text) and not getattr(text, "sliding_window", None):
        raise _refuse("sliding_window", getattr(text, "sliding_window", None), "a window of >= 1 position for the "
                      "local layers")
    rope_by_layer_type(text)


class Gemma3Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding, sliding_window: int | None) -> None:
        super().__init__()
        head_dim = config.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, bias)
        self.q_size = self.qkv_proj.num_heads * head_dim
        self.kv_size = self.qkv_proj.num_kv_heads * head_dim
        self.head_dim = head_dim
        self.q_norm = GemmaRMSNorm(head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(head_dim, config.rms_norm_eps)
        self.attn = PagedAttention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim,
                                   config.query_pre_attn_scalar**-0.5, rotary, sliding_window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)  # per head, before RoPE
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        out = self.attn(positions, q, k, v, meta)
        return self.o_proj(out if keep is None else out[keep])


class Gemma3MLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size)
        self.act = ActAndMul(config.hidden_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary: RotaryEmbedding, sliding_window: int | None) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.self_attn = Gemma3Attention(config, rotary, sliding_window)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.mlp = Gemma3MLP(config)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's normed MLP output, the residual stream before it is added), for the rows `keep`
        only where given (all rows still write their K/V). The attention output is normed before it joins the
        residual stream, the MLP's after it leaves: the norm that adds into the residual is the one after each."""
        if residual is None:
            residual = x  # the embeddings, which nothing else reads: later layers add into it in place
            x = self.input_layernorm(x)
        else:
            x = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x, meta, keep))
        if keep is not None:
            residual = residual[keep]
        x = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma3TextModel(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        check_gemma3_text(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, config.hidden_size**0.5)
        rope = rope_by_layer_type(config)
        rotary = {kind: RotaryEmbedding(config.head_dim, config.max_position_embeddings, rope[kind])
                  for kind in LAYER_TYPES}
        window = {"sliding_attention": config.sliding_window, "full_attention": None}
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, rotary[kind], window[kind])
                                    for kind in layer_types(config))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, meta: AttentionMetadata,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states of every row, or of the rows `keep` (a prefill needs only each prompt's last)."""
        x, residual = embeds, None
        for i, layer in enumerate(self.layers):
            x, residual = layer(positions, x, residual, meta, keep if i == len(self.layers) - 1 else None)
        return self.norm(x, residual)
