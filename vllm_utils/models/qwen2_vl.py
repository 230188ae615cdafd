"""Qwen2-VL and Qwen2.5-VL (HF `Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`): images
and videos at their own resolution through the vision transformer, each 2x2 block of patches one prompt position,
on a Qwen2 decoder rotated by multimodal RoPE. A text token's three position rows are equal; an image's or a video's
positions count (frame, row, column) from where the item starts, and the text after it resumes from the item's
start plus its larger side; tokens generated after the prompt continue from the prompt's largest position."""
import re

import torch
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.layers.embedding import ParallelLMHead
from vllm_utils.models.llama import PACKED_MODULES, LlamaModel, MultimodalDecoderLM
from vllm_utils.models.qwen2_vl_vision import Qwen2VisionTransformer, check_vision_config
from vllm_utils.models.text_backbones import decoder_spec
from vllm_utils.multimodal.inputs import MultiModalInputs

# Checkpoint key prefixes (hub layout, transformers >= 4.52 layout) -> ours.
_KEY_RULES = [
    (re.compile(r"^model\.visual\."), "visual."),
    (re.compile(r"^model\.language_model\."), "language_model."),
    (re.compile(r"^model\."), "language_model."),
]


class Qwen2VLForConditionalGeneration(MultimodalDecoderLM):
    packed_modules = PACKED_MODULES
    position_rows = 3

    @staticmethod
    def check_config(config: PretrainedConfig) -> None:
        check_vision_config(config.vision_config)
        decoder_spec(config.text_config)

    @classmethod
    def tensor_parallel_widths(cls, config: PretrainedConfig) -> dict[str, int]:
        vision = config.vision_config
        gated = vision.model_type == "qwen2_5_vl_vision"  # Qwen2.5-VL's tower: a gated MLP of intermediate_size
        mlp = vision.intermediate_size if gated else int(vision.embed_dim * vision.mlp_ratio)
        return {**super().tensor_parallel_widths(config), "the vision attention heads": vision.num_heads,
                "the vision MLP width": mlp}

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.check_config(config)
        vision, text = config.vision_config, config.text_config
        self.mm_token_ids = (config.image_token_id, config.video_token_id)
        self.merge = vision.spatial_merge_size
        self.max_positions = text.max_position_embeddings  # the size of the RoPE tables
        self.tokens_per_second = getattr(vision, "tokens_per_second", None)  # Qwen2.5-VL: video time positions
        out_dim = vision.out_hidden_size if vision.model_type == "qwen2_5_vl_vision" else vision.hidden_size
        self.visual = Qwen2VisionTransformer(vision, out_dim)
        self.language_model = LlamaModel(text)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        if getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False):
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
        """The prompt's position rows [3, tokens] and the offset of the tokens after it (position = index +
        offset), as transformers' `get_rope_index` counts them. `is_mm` marks the items' positions."""
        grids = mm_inputs["grid_thw"].tolist() if mm_inputs else []
        videos = mm_inputs["is_video"].tolist() if mm_inputs else []
        seconds = mm_inputs["second_per_grid_ts"] if mm_inputs else None
        parts, start, i, item = [], 0, 0, 0
        while i < len(is_mm):
            if not is_mm[i]:
                end = next((j for j in range(i, len(is_mm)) if is_mm[j]), len(is_mm))
                parts.append(torch.arange(start, start + end - i).expand(3, -1))
                start, i = start + end - i, end
                continue
            t, h, w = grids[item][0], grids[item][1] // self.merge, grids[item][2] // self.merge
            interval = 1.0
            if videos[item] and self.tokens_per_second is not None:
                interval = self.tokens_per_second * seconds[item].float()
            frame = (torch.arange(t) * interval).long() + start
            grid = torch.stack(torch.meshgrid(frame, torch.arange(h) + start, torch.arange(w) + start,
                                              indexing="ij")).flatten(1)
            parts.append(grid)
            start += max(h, w)
            i += grid.shape[1]
            item += 1
        positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
        if positions.numel() and int(positions.max()) >= self.max_positions:
            raise UserError(f"the prompt's positions reach {int(positions.max())}, beyond the model's "
                            f"max_position_embeddings ({self.max_positions}); use fewer or shorter videos")
        return positions, int(positions.max()) + 1 - len(is_mm) if len(is_mm) else 0

    def checkpoint_key(self, key: str) -> str | None:
        for pattern, replacement in _KEY_RULES:
            if pattern.match(key):
                key = pattern.sub(replacement, key)
                break
        if key.endswith("rotary_emb.inv_freq") or key.endswith("rotary_pos_emb.inv_freq"):
            return None
        return key


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """The same model class: the vision config's type selects Qwen2.5-VL's tower."""
