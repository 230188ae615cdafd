"""LLaVA-1.5: CLIP vision tower (truncated at vision_feature_layer) -> GELU projector -> Llama.
Image features replace the embeddings of the image placeholder positions."""
import re

import torch
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.layers.activation import Activation, check_activation
from vllm_utils.layers.embedding import ParallelLMHead
from vllm_utils.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm_utils.models.clip import CLIPVisionTower
from vllm_utils.models.llama import PACKED_MODULES, LlamaModel, MultimodalDecoderLM
from vllm_utils.models.siglip import SiglipVisionTower
from vllm_utils.models.text_backbones import decoder_spec
from vllm_utils.multimodal.inputs import MultiModalInputs

# Checkpoint key prefixes (hub layout, transformers >= 4.52 layout, transformers 5.2x layout) -> ours.
_KEY_RULES = [
    (re.compile(r"^model\.language_model\."), "language_model."),
    (re.compile(r"^language_model\.model\."), "language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^model\.vision_tower\."), "vision_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
    (re.compile(r"^model\.image_newline$"), "image_newline"),  # LLaVA-NeXT's
]


def canonical_key(key: str) -> str:
    for pattern, replacement in _KEY_RULES:
        key = pattern.sub(replacement, key)
    return key


VISION_TOWERS = {"clip_vision_model": CLIPVisionTower, "siglip_vision_model": SiglipVisionTower}


def image_features(config: PretrainedConfig) -> int:
    """Positions one image takes in the prompt: one per patch, plus CLIP's class token, less the first of them
    with the "default" strategy (which drops it)."""
    vision = config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + (vision.model_type == "clip_vision_model")
    return tokens - (config.vision_feature_select_strategy == "default")


_VISION_LAYER = re.compile(r"^vision_tower\.encoder\.layers\.(\d+)\.")


class LlavaProjector(nn.Module):
    def __init__(self, in_features: int, hidden: int, act: str, bias: bool) -> None:
        super().__init__()
        self.linear_1 = ColumnParallelLinear(in_features, hidden, bias=bias)
        self.act = Activation(act)
        self.linear_2 = RowParallelLinear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(MultimodalDecoderLM):
    packed_modules = PACKED_MODULES
    position_rows = 1

    @staticmethod
    def check_config(config: PretrainedConfig) -> None:
        """Refuses, by name, every configuration value this model does not implement."""
        vision = config.vision_config
        if getattr(vision, "model_type", None) not in VISION_TOWERS:
            raise UserError(f"vision_config.model_type '{getattr(vision, 'model_type', None)}' is not supported "
                            f"(supported: {', '.join(VISION_TOWERS)})")
        check_activation(vision.hidden_act, "vision_config.hidden_act")
        check_activation(config.projector_hidden_act, "projector_hidden_act")
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise UserError(f"vision_feature_select_strategy '{config.vision_feature_select_strategy}' is not "
                            f"supported (supported: default, full)")
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
        self.strategy = config.vision_feature_select_strategy
        layers = config.vision_feature_layer
        layers = layers if isinstance(layers, (list, tuple)) else [layers]
        self.feature_layers = [i if i >= 0 else vision.num_hidden_layers + 1 + i for i in layers]
        self.vision_config = vision
        video = getattr(config, "video_token_index", None)  # the families that take videos
        self.mm_token_ids = (config.image_token_index,) + ((video,) if video is not None else ())
        self.num_image_features = image_features(config)

        self.vision_tower = VISION_TOWERS[vision.model_type](vision, max(self.feature_layers))
        self.multi_modal_projector = LlavaProjector(
            vision.hidden_size * len(self.feature_layers), text.hidden_size, config.projector_hidden_act,
            getattr(config, "multimodal_projector_bias", True),
        )
        self.language_model = LlamaModel(text)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        if getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False):
            self.lm_head.weight = self.language_model.embed_tokens.weight

    def prompt_only_modules(self) -> list[tuple[nn.Module, int]]:
        return [(self.vision_tower, self.num_image_features), (self.multi_modal_projector, self.num_image_features)]

    def encode_mm(self, mm_inputs: MultiModalInputs) -> torch.Tensor:
        """pixel_values [images, 3, H, W] -> [images * num_image_features, hidden]"""
        return self.encode_images(mm_inputs["pixel_values"]).flatten(0, 1)

    def static_mm_item(self) -> MultiModalInputs:
        size = self.vision_config.image_size
        return {"pixel_values": torch.zeros(1, self.vision_config.num_channels, size, size)}

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, 3, H, W] -> [images, num_image_features, hidden]"""
        states = self.vision_tower(pixel_values, self.feature_layers)
        features = torch.cat(states, dim=-1)
        if self.strategy == "default":
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    def checkpoint_key(self, key: str) -> str | None:
        """Our name for a checkpoint tensor, or None for tensors LLaVA never uses."""
        key = canonical_key(key)
        if key.endswith(("position_ids", "rotary_emb.inv_freq")) or \
                key.startswith(("vision_tower.post_layernorm.", "vision_tower.head.")):
            return None  # never run: LLaVA reads the tower's hidden states
        layer = _VISION_LAYER.match(key)
        if layer and int(layer.group(1)) >= len(self.vision_tower.encoder.layers):
            return None  # layers after the feature layer are never run
        return key
