"""InternVL (HF `InternVLForConditionalGeneration`: OpenGVLab/InternVL3-*-hf, InternVL3_5-*-HF): each image tile
through InternViT (`internvl_vision.py`) up to `vision_feature_layer`, its class token dropped, its patch grid
pixel-shuffled (each 2x2 block of patches one position of four times the width, at `downsample_ratio` 0.5) and
projected (LayerNorm, linear, GELU, linear) into the decoder (Qwen2, Llama or Qwen3: `text_backbones.py`). An
image is one item of several tiles, a video one item of its frames; every tile takes the same positions."""
import re

import torch
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.layers.activation import Activation, check_activation
from vllm_utils.layers.embedding import ParallelLMHead
from vllm_utils.layers.linear import LinearBase
from vllm_utils.models.internvl_vision import InternVisionModel, check_vision_config
from vllm_utils.models.llama import PACKED_MODULES, LlamaModel, MultimodalDecoderLM
from vllm_utils.models.text_backbones import decoder_spec
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.multimodal.internvl import patch_grid, shuffle_factor, tile_positions

# Checkpoint key prefixes (InternVL3-*-hf's layout, and the one transformers 5 writes, InternVL3_5-*-HF's) -> ours.
_KEY_RULES = [
    (re.compile(r"^model\.(vision_tower|multi_modal_projector|language_model)\."), r"\1."),
    (re.compile(r"^language_model\.model\."), "language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
]
_VISION_LAYER = re.compile(r"^vision_tower\.encoder\.layer\.(\d+)\.")


def canonical_key(key: str) -> str:
    for pattern, replacement in _KEY_RULES:
        key = pattern.sub(replacement, key)
    return key


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """transformers' InternVL pixel shuffle: [tiles, side, side, c] -> [tiles, side * r, side * r, c / r^2], step
    for step (the order of the channels of a block is the checkpoint's)."""
    tiles, width, height, channels = x.shape
    x = x.view(tiles, width, int(height * ratio), int(channels / ratio)).permute(0, 2, 1, 3).contiguous()
    x = x.view(tiles, int(height * ratio), int(width * ratio), int(channels / (ratio * ratio)))
    return x.permute(0, 2, 1, 3).contiguous()


class InternVLProjector(nn.Module):
    def __init__(self, width: int, hidden: int, act: str) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(width)
        self.linear_1 = LinearBase(width, hidden, bias=True)
        self.act = Activation(act)
        self.linear_2 = LinearBase(hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


class InternVLForConditionalGeneration(MultimodalDecoderLM):
    packed_modules = PACKED_MODULES
    position_rows = 1

    @staticmethod
    def check_config(config: PretrainedConfig) -> None:
        """Refuses, by name, every configuration value this model does not implement."""
        vision = config.vision_config
        check_vision_config(vision)
        layer = config.vision_feature_layer
        if not isinstance(layer, int) or not -(vision.num_hidden_layers + 1) <= layer <= vision.num_hidden_layers:
            raise UserError(f"vision_feature_layer = {layer!r} is not supported (one layer index of the "
                            f"{vision.num_hidden_layers}-layer vision tower)")
        if config.vision_feature_select_strategy != "default":
            raise UserError(f"vision_feature_select_strategy '{config.vision_feature_select_strategy}' is not "
                            f"supported (supported: default: the class token dropped before the pixel shuffle)")
        shuffle_factor(config)
        check_activation(config.projector_hidden_act, "projector_hidden_act")
        decoder_spec(config.text_config)

    @classmethod
    def tensor_parallel_widths(cls, config: PretrainedConfig) -> dict[str, int]:
        vision = config.vision_config
        return {**super().tensor_parallel_widths(config), "the vision attention heads": vision.num_attention_heads,
                "the vision MLP width": vision.intermediate_size}

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.check_config(config)
        vision, text = config.vision_config, config.text_config
        self.vision_config = vision
        self.mm_token_ids = (config.image_token_id,)
        self.ratio = config.downsample_ratio
        self.num_tile_features = tile_positions(config)
        self.vision_tower = InternVisionModel(vision, config.vision_feature_layer)
        width = vision.hidden_size * shuffle_factor(config) ** 2
        self.multi_modal_projector = InternVLProjector(width, text.hidden_size, config.projector_hidden_act)
        self.language_model = LlamaModel(text)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        if getattr(config, "tie_word_embeddings", False):  # as transformers ties (the loader unties a checkpoint's
            self.lm_head.weight = self.language_model.embed_tokens.weight  # own lm_head, as transformers does)

    def prompt_only_modules(self) -> list[tuple[nn.Module, int]]:
        grid = patch_grid(self.vision_config)
        return [(self.vision_tower, grid * grid + 1), (self.multi_modal_projector, self.num_tile_features)]

    def encode_mm(self, mm_inputs: MultiModalInputs) -> torch.Tensor:
        """pixel_values [tiles, 3, H, W] (every item's tiles or frames, in order) -> [tiles * positions, hidden]"""
        features = self.vision_tower(mm_inputs["pixel_values"])[:, 1:]  # the class token dropped
        tiles, patches, width = features.shape
        side = int(patches**0.5)
        shuffled = pixel_shuffle(features.reshape(tiles, side, side, width), self.ratio)
        return self.multi_modal_projector(shuffled.reshape(tiles, -1, shuffled.shape[-1])).flatten(0, 1)

    def static_mm_item(self) -> None:
        return None  # an item's tile count varies

    def checkpoint_key(self, key: str) -> str | None:
        """Our name for a checkpoint tensor, or None for those never used (the mask token, layers past the one
        read, a final LayerNorm not applied)."""
        key = canonical_key(key)
        if key.endswith(("position_ids", "rotary_emb.inv_freq")) or key == "vision_tower.embeddings.mask_token":
            return None
        layer = _VISION_LAYER.match(key)
        if layer and int(layer.group(1)) >= len(self.vision_tower.encoder.layer):
            return None
        if key.startswith("vision_tower.layernorm.") and not self.vision_tower.final_norm:
            return None
        return key
