"""GLM-4.1V (HF `Glm4vForConditionalGeneration`, zai-org/GLM-4.1V-9B-Thinking): images and videos at their own
resolution through GLM's vision tower (`glm4v_vision.py`), each 2x2 block of patches one prompt position, on a
GLM-4 decoder: Llama's layer with biases on q, k and v, a fused gate_up checkpoint tensor, and two more RMSNorms (on
the attention's and the MLP's outputs, before each joins the residual stream). Multimodal RoPE turns only the first
`partial_rotary_factor` of each head, on interleaved pairs of channels. Positions count as Qwen2-VL's do, a video's
temporal patches each a picture of its own (the prompt writes their times between them): a text token's three rows
are equal, a picture's (frame, row, column) start where it starts, the text after it resumes from that start plus
its larger side, and generated tokens continue from the prompt's largest."""
import re
from functools import partial

import torch
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.attention.metadata import AttentionMetadata
from vllm_utils.errors import UserError
from vllm_utils.layers.activation import check_activation
from vllm_utils.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from vllm_utils.layers.rotary import MRotaryEmbedding, rope_parameters
from vllm_utils.models.frame_positions import frame_positions
from vllm_utils.models.glm4v_vision import Glm4vVisionTransformer, check_vision_config
from vllm_utils.models.llama import PACKED_MODULES, LlamaAttention, LlamaMLP, MultimodalDecoderLM, make_norm
from vllm_utils.models.text_backbones import DecoderSpec, refuse
from vllm_utils.multimodal.inputs import MultiModalInputs

# Checkpoint key prefixes (the hub's layout, and the older one without language_model) -> ours.
_KEY_RULES = [
    (re.compile(r"^model\.visual\."), "visual."),
    (re.compile(r"^model\.language_model\."), "language_model."),
    (re.compile(r"^model\."), "language_model."),
]
_DEFAULT_MROPE_SECTION = [8, 12, 12]  # transformers' default where the config names none


def text_spec(text: PretrainedConfig) -> tuple[DecoderSpec, int]:
    """The decoder's switches and the channels of a head that RoPE turns; refuses, by name, what differs from
    transformers' Glm4vTextModel in a way this decoder does not implement."""
    if text.model_type != "glm4v_text":
        raise UserError(f"text_config.model_type '{text.model_type}' is not supported (supported: glm4v_text)")
    head_dim = text.hidden_size // text.num_attention_heads
    if getattr(text, "head_dim", None) not in (None, head_dim):
        raise refuse("head_dim", text.head_dim, f"only hidden_size / num_attention_heads ({head_dim})")
    rope = rope_parameters(text)
    if rope.get("rope_type", "default") != "default":
        raise refuse("rope_parameters.rope_type", rope.get("rope_type"), "supported: default")
    factor = rope.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", None) or 1.0)
    rotary_dim = int(head_dim * factor)
    if not 0 < rotary_dim <= head_dim or rotary_dim % 2:
        raise refuse("partial_rotary_factor", factor, "RoPE must turn an even number of channels of a head")
    sections = list(rope.get("mrope_section") or _DEFAULT_MROPE_SECTION)
    if sum(sections) != rotary_dim // 2:
        raise refuse("rope_parameters.mrope_section", sections,
                     f"must sum to the {rotary_dim // 2} frequencies RoPE turns")
    check_activation(text.hidden_act, "text_config.hidden_act")
    spec = DecoderSpec(model_type=text.model_type, hidden_act=text.hidden_act, head_dim=head_dim, qkv_bias=True,
                       o_bias=False, mlp_bias=False, gemma_norm=False, embed_scale=None,
                       sliding_windows=(None,) * text.num_hidden_layers, rope=rope, mrope_sections=tuple(sections))
    return spec, rotary_dim


def halves_order(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """For each of our channels of a head, the checkpoint's channel it holds: rotated pair j (channels 2j, 2j + 1)
    at j and j + head_dim / 2, the channels RoPE leaves alone in the rest of each half."""
    pairs, rest = rotary_dim // 2, (head_dim - rotary_dim) // 2
    first = [2 * j for j in range(pairs)] + [rotary_dim + i for i in range(rest)]
    second = [2 * j + 1 for j in range(pairs)] + [rotary_dim + rest + i for i in range(rest)]
    return torch.tensor(first + second)


class Glm4RotaryEmbedding(MRotaryEmbedding):
    """GLM's RoPE in our rotate-half layout, so that every RoPE kernel computes it: with q's and k's channels
    reordered at load by `halves_order`, frequency j turns channels (j, j + head_dim / 2) as transformers turns the
    interleaved pair (2j, 2j + 1); the channels it leaves alone get frequency zero (cos 1, sin 0: unchanged). The
    reorder is the same for q and k, so their dot products, and the attention, are transformers' own."""

    def __init__(self, head_dim: int, rotary_dim: int, max_positions: int, theta: float,
                 sections: list[int]) -> None:
        still = (head_dim - rotary_dim) // 2
        super().__init__(head_dim, max_positions, {"rope_type": "default", "rope_theta": theta}, sections + [still])
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        inv_freq = torch.cat([inv_freq, torch.zeros(still, dtype=torch.float32)])
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()


def _load_reordered(load, order: torch.Tensor, param: nn.Parameter, loaded: torch.Tensor,
                    shard: object = None) -> None:
    """A q or k tensor (weight or bias) with each head's channels in `order`; v and fused tensors as they come."""
    if shard is None:
        raise UserError("the checkpoint holds q, k and v fused; GLM-4.1V's checkpoints hold q_proj, k_proj and "
                        "v_proj apart")
    if shard in ("q", "k"):
        heads = loaded.shape[0] // len(order)
        loaded = loaded.view(heads, len(order), *loaded.shape[1:])[:, order.to(loaded.device)].flatten(0, 1)
    load(param, loaded, shard)


class Glm4DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, spec: DecoderSpec, rotary: Glm4RotaryEmbedding,
                 order: torch.Tensor) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config, spec)
        self.self_attn = LlamaAttention(config, spec, rotary, None)
        self.post_self_attn_layernorm = make_norm(config, spec)
        self.post_attention_layernorm = make_norm(config, spec)
        self.mlp = LlamaMLP(config, spec)
        self.post_mlp_layernorm = make_norm(config, spec)
        qkv = self.self_attn.qkv_proj
        for param in (qkv.weight, qkv.bias):
            param.weight_loader = partial(_load_reordered, param.weight_loader, order)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's normed MLP output, the residual stream before it is added), for the rows `keep`
        only where given (all rows still write their K/V)."""
        if residual is None:
            residual = x  # the embeddings, which nothing else reads: later layers add into it in place
            x = self.input_layernorm(x)
        else:
            x = self.input_layernorm(x, residual)
        x = self.post_self_attn_layernorm(self.self_attn(positions, x, meta, keep))
        if keep is not None:
            residual = residual[keep]
        x = self.post_attention_layernorm(x, residual)
        return self.post_mlp_layernorm(self.mlp(x)), residual


class Glm4Model(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        spec, rotary_dim = text_spec(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary = Glm4RotaryEmbedding(spec.head_dim, rotary_dim, config.max_position_embeddings,
                                     float(spec.rope.get("rope_theta", 10000.0)), list(spec.mrope_sections))
        order = halves_order(spec.head_dim, rotary_dim)
        self.layers = nn.ModuleList(Glm4DecoderLayer(config, spec, rotary, order)
                                    for _ in range(config.num_hidden_layers))
        self.norm = make_norm(config, spec)

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, meta: AttentionMetadata,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        x, residual = embeds, None
        for i, layer in enumerate(self.layers):
            x, residual = layer(positions, x, residual, meta, keep if i == len(self.layers) - 1 else None)
        return self.norm(x, residual)


class Glm4vForConditionalGeneration(MultimodalDecoderLM):
    packed_modules = PACKED_MODULES
    position_rows = 3

    @staticmethod
    def check_config(config: PretrainedConfig) -> None:
        vision, text = config.vision_config, config.text_config
        check_vision_config(vision)
        text_spec(text)
        if vision.in_channels != 3:
            raise UserError(f"vision_config.in_channels = {vision.in_channels} is not supported (the processor "
                            f"gives RGB: 3)")
        if vision.out_hidden_size != text.hidden_size:
            raise UserError(f"vision_config.out_hidden_size {vision.out_hidden_size} differs from "
                            f"text_config.hidden_size {text.hidden_size}")

    @classmethod
    def tensor_parallel_widths(cls, config: PretrainedConfig) -> dict[str, int]:
        vision = config.vision_config
        return {**super().tensor_parallel_widths(config), "the vision attention heads": vision.num_heads,
                "the vision MLP width": vision.out_hidden_size, "the vision merger width": vision.intermediate_size}

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.check_config(config)
        text = config.text_config
        self.mm_token_ids = (config.image_token_id,)
        self.merge = config.vision_config.spatial_merge_size
        self.max_positions = text.max_position_embeddings  # the size of the RoPE tables
        self.visual = Glm4vVisionTransformer(config.vision_config)
        self.language_model = Glm4Model(text)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.language_model.embed_tokens.weight

    def prompt_only_modules(self) -> list[tuple[nn.Module, int]]:
        return [(self.visual, 1024)]

    def static_mm_item(self) -> None:
        return None  # items vary in size

    def encode_mm(self, mm_inputs: MultiModalInputs) -> torch.Tensor:
        """pixel_values [patches, 3 * 2 * 14 * 14], grid_thw [items, 3] -> [positions, hidden]."""
        return self.visual(mm_inputs["pixel_values"], mm_inputs["grid_thw"])

    def rope_positions(self, is_mm: list[bool], mm_inputs: MultiModalInputs | None,
                       token_ids: list[int] | None = None) -> tuple[torch.Tensor, int]:
        """As transformers' `get_rope_index` counts them: frame by frame (`frame_positions.py`)."""
        return frame_positions(is_mm, mm_inputs["grid_thw"] if mm_inputs else None, self.merge, self.max_positions)

    def checkpoint_key(self, key: str) -> str | None:
        for pattern, replacement in _KEY_RULES:
            if pattern.match(key):
                key = pattern.sub(replacement, key)
                break
        if key.endswith("rotary_emb.inv_freq") or key.endswith("rotary_pos_emb.inv_freq"):
            return None
        return key
