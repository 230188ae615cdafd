"""Qwen3-VL (HF `Qwen3VLForConditionalGeneration`, Qwen/Qwen3-VL-2B/4B/8B/32B-Instruct): images and videos at their
own resolution through Qwen3-VL's vision tower (`qwen3_vl_vision.py`), each 2x2 block of 16-px patches one prompt
position, on a Qwen3 decoder (per-head q/k RMSNorm) rotated by *interleaved* multimodal RoPE: frequency j turns with
the height row where j % 3 == 1 (the first mrope_section[1] such), the width row where j % 3 == 2 (the first
mrope_section[2]), the time row elsewhere. DeepStack: the tower's features of a few of its blocks, each merged by its
own merger, are added to the hidden states at the visual positions after decoder layers 0, 1, ...; `encode_mm`
returns them beside the embeddings ([positions, hidden * (1 + k)]), so that they travel with the rows the engine
keeps and slices per chunk. Positions count as GLM-4.1V's: each frame of a video is a picture of its own (the
prompt writes its time before it), text resumes from a picture's start plus its larger side."""
import re

import torch
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.attention.metadata import AttentionMetadata
from vllm_utils.errors import UserError
from vllm_utils.layers.activation import check_activation
from vllm_utils.layers.embedding import ParallelLMHead, VocabParallelEmbedding, embed_with_mm
from vllm_utils.layers.rotary import MRotaryEmbedding, rope_parameters
from vllm_utils.models.frame_positions import frame_positions
from vllm_utils.models.llama import PACKED_MODULES, LlamaDecoderLayer, MultimodalDecoderLM, make_norm
from vllm_utils.models.qwen3_vl_vision import Qwen3VLVisionTransformer, check_vision_config
from vllm_utils.models.text_backbones import DecoderSpec, refuse
from vllm_utils.multimodal.inputs import MultiModalInputs

# Checkpoint key prefixes (the hub's layout, and one without language_model) -> ours.
_KEY_RULES = [
    (re.compile(r"^model\.visual\."), "visual."),
    (re.compile(r"^model\.language_model\."), "language_model."),
    (re.compile(r"^model\."), "language_model."),
]
_DEFAULT_MROPE_SECTION = [24, 20, 20]  # transformers' default where the config names none
# fields of Qwen3-VL-MoE's text config (experts): this decoder's MLP is dense
_MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers")


def text_spec(text: PretrainedConfig) -> DecoderSpec:
    """The decoder's switches; refuses, by name, what differs from transformers' Qwen3VLTextModel in a way this
    decoder does not implement."""
    if text.model_type != "qwen3_vl_text":
        raise UserError(f"text_config.model_type '{text.model_type}' is not supported (supported: qwen3_vl_text)")
    for field in _MOE_FIELDS:
        if getattr(text, field, None) not in (None, [], ()):
            raise refuse(field, getattr(text, field), "Qwen3-VL-MoE's experts are not implemented")
    rope = rope_parameters(text)
    if rope.get("rope_type", "default") != "default":
        raise refuse("rope_parameters.rope_type", rope.get("rope_type"), "supported: default")
    sections = list(rope.pop("mrope_section", None) or _DEFAULT_MROPE_SECTION)
    rope.pop("mrope_interleaved", None)  # transformers interleaves whatever it says
    if len(sections) != 3:
        raise refuse("rope_parameters.mrope_section", sections, "three sections: time, height, width")
    partial = rope.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", None) or 1.0)
    if partial != 1.0:
        raise refuse("partial_rotary_factor", partial, "only 1.0: RoPE on the whole head")
    check_activation(text.hidden_act, "text_config.hidden_act")
    bias = bool(getattr(text, "attention_bias", False))
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return DecoderSpec(model_type=text.model_type, hidden_act=text.hidden_act, head_dim=head_dim, qkv_bias=bias,
                       o_bias=bias, mlp_bias=False, gemma_norm=False, embed_scale=None,
                       sliding_windows=(None,) * text.num_hidden_layers, rope=rope, mrope_sections=tuple(sections),
                       qk_norm=True)


def interleaved_rows(half: int, sections: list[int]) -> list[int]:
    """The position row (0 time, 1 height, 2 width) of each of a head's `half` frequencies, as transformers'
    `Qwen3VLTextRotaryEmbedding.recomposition_frequencies` lays them out."""
    return [1 if j % 3 == 1 and j < 3 * sections[1] else 2 if j % 3 == 2 and j < 3 * sections[2] else 0
            for j in range(half)]


class InterleavedMRotaryEmbedding(MRotaryEmbedding):
    """Multimodal RoPE whose frequencies take their rows interleaved (T H W T H W ... T), not in blocks."""

    def __init__(self, head_dim: int, max_positions: int, params: dict, sections: list[int]) -> None:
        half = head_dim // 2
        super().__init__(head_dim, max_positions, params, [half, 0, 0])
        rows = interleaved_rows(half, sections)
        self.register_buffer("freq_rows", torch.tensor(rows + rows), persistent=False)


class Qwen3VLTextModel(nn.Module):
    """The Qwen3 decoder, its layer loop adding DeepStack's features after the first layers."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        spec = text_spec(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary = InterleavedMRotaryEmbedding(spec.head_dim, config.max_position_embeddings, spec.rope,
                                             list(spec.mrope_sections))
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, spec, rotary, None)
                                    for _ in range(config.num_hidden_layers))
        self.norm = make_norm(config, spec)

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, meta: AttentionMetadata,
                deepstack: list[torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        """`deepstack[i]` [tokens, hidden]: what layer i's output gains (zero off the visual positions)."""
        x, residual = embeds, None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, residual = layer(positions, x, residual, meta, keep if i == last else None)
            if i < len(deepstack):  # the layer's output is x + residual: DeepStack adds to it
                x = x + (deepstack[i] if keep is None or i != last else deepstack[i][keep])
        return self.norm(x, residual)


class Qwen3VLForConditionalGeneration(MultimodalDecoderLM):
    packed_modules = PACKED_MODULES
    position_rows = 3
    text_model: type[nn.Module] = Qwen3VLTextModel  # its decoder: the config's text_config -> the module

    @staticmethod
    def check_text_config(text: PretrainedConfig) -> None:
        text_spec(text)

    @classmethod
    def check_config(cls, config: PretrainedConfig) -> None:
        vision, text = config.vision_config, config.text_config
        check_vision_config(vision)
        cls.check_text_config(text)
        if vision.in_channels != 3:
            raise UserError(f"vision_config.in_channels = {vision.in_channels} is not supported (the processor "
                            f"gives RGB: 3)")
        if vision.out_hidden_size != text.hidden_size:
            raise UserError(f"vision_config.out_hidden_size {vision.out_hidden_size} differs from "
                            f"text_config.hidden_size {text.hidden_size}")
        deepstack = getattr(vision, "deepstack_visual_indexes", [])
        if len(deepstack) > text.num_hidden_layers:
            raise UserError(f"vision_config.deepstack_visual_indexes has {len(deepstack)} entries, more than the "
                            f"{text.num_hidden_layers} decoder layers")

    @classmethod
    def tensor_parallel_widths(cls, config: PretrainedConfig) -> dict[str, int]:
        vision = config.vision_config
        return {**super().tensor_parallel_widths(config), "the vision attention heads": vision.num_heads,
                "the vision MLP width": vision.intermediate_size,
                "the vision merger width": vision.hidden_size * vision.spatial_merge_size**2}

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.check_config(config)
        text = config.text_config
        self.mm_token_ids = (config.image_token_id, config.video_token_id)
        self.merge = config.vision_config.spatial_merge_size
        self.hidden = text.hidden_size
        self.max_positions = text.max_position_embeddings  # the size of the RoPE tables
        self.visual = Qwen3VLVisionTransformer(config.vision_config)
        self.language_model = self.text_model(text)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.language_model.embed_tokens.weight

    def prompt_only_modules(self) -> list[tuple[nn.Module, int]]:
        return [(self.visual, 1024)]

    def static_mm_item(self) -> None:
        return None  # items vary in size

    def encode_mm(self, mm_inputs: MultiModalInputs) -> torch.Tensor:
        """pixel_values [patches, 3 * 2 * 16 * 16], grid_thw [items, 3] -> [positions, hidden * (1 + k)]: each
        position's embedding, then its k DeepStack features."""
        merged, deepstack = self.visual(mm_inputs["pixel_values"], mm_inputs["grid_thw"])
        return torch.cat([merged, *deepstack], dim=-1)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                mm_embeds: torch.Tensor | None = None, mm_mask: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states of every token, or of the rows `keep` only. The rows of `mm_embeds` go to the
        positions `mm_mask` marks, in order: their first `hidden` columns as the embedding, the rest DeepStack's."""
        deepstack = []
        if mm_embeds is not None:
            parts = mm_embeds.split(self.hidden, dim=-1)
            embeds = embed_with_mm(self.language_model.embed_tokens, input_ids, parts[0], mm_mask)
            source = (mm_mask.cumsum(0) - 1).clamp(min=0)  # a gather, as embed_with_mm: no host synchronisation
            deepstack = [torch.where(mm_mask[:, None], part[source].to(embeds.dtype), 0) for part in parts[1:]]
        else:
            embeds = self.language_model.embed_tokens(input_ids)
        return self.language_model(positions, embeds, meta, deepstack, keep)

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
