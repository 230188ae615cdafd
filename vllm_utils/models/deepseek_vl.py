"""DeepSeek-VL: SigLIP's last hidden state (after its post-layernorm) -> the aligner (linear, GELU, linear) -> a Llama
decoder. DeepSeek-VL-hybrid adds SAM's high-resolution encoder (`sam_vision.py`): its output and the neck of its
global layer's output, resized to SigLIP's grid, are fused with the SigLIP features in the aligner. Every image
takes one prompt position per SigLIP patch."""
import re

import torch
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.layers.activation import Activation, check_activation
from vllm_utils.layers.embedding import ParallelLMHead
from vllm_utils.layers.linear import LinearBase
from vllm_utils.models.llama import PACKED_MODULES, LlamaModel, MultimodalDecoderLM
from vllm_utils.models.llava import LlavaProjector
from vllm_utils.models.sam_vision import SamNeck, SamVisionEncoder, check_sam_config
from vllm_utils.models.siglip import SiglipVisionModel
from vllm_utils.models.text_backbones import decoder_spec
from vllm_utils.multimodal.inputs import MultiModalInputs

# Checkpoint key prefixes (the hub's transformers 4.5x layout, and what transformers 5 writes) -> ours.
_KEY_RULES = [
    (re.compile(r"^model\."), ""),
    (re.compile(r"^vision_model\.vision_model\."), "vision_model."),
    (re.compile(r"^high_res_vision_model\.vision_encoder\."), "high_res_vision_model."),
    (re.compile(r"^aligner\.linear(\d)\."), r"aligner.linear_\1."),
]


def canonical_key(key: str) -> str:
    for pattern, replacement in _KEY_RULES:
        key = pattern.sub(replacement, key)
    return key


def image_positions(config: PretrainedConfig) -> int:
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


class DeepseekVLForConditionalGeneration(MultimodalDecoderLM):
    packed_modules = PACKED_MODULES
    position_rows = 1

    @staticmethod
    def check_config(config: PretrainedConfig) -> None:
        """Refuses, by name, every configuration value this model does not implement."""
        vision = config.vision_config
        if getattr(vision, "model_type", None) != "siglip_vision_model":
            raise UserError(f"vision_config.model_type '{getattr(vision, 'model_type', None)}' is not supported "
                            f"(supported: siglip_vision_model)")
        check_activation(vision.hidden_act, "vision_config.hidden_act")
        if vision.image_size % vision.patch_size:
            raise UserError(f"vision_config.image_size {vision.image_size} is not a multiple of its patch_size "
                            f"{vision.patch_size}")
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
        self.num_image_features = image_positions(config)
        self.vision_model = SiglipVisionModel(vision)
        self.aligner = self.make_aligner(config)
        self.language_model = LlamaModel(text)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        if getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False):
            self.lm_head.weight = self.language_model.embed_tokens.weight

    def make_aligner(self, config: PretrainedConfig) -> nn.Module:
        return LlavaProjector(config.vision_config.hidden_size, config.text_config.hidden_size, "gelu", bias=True)

    def prompt_only_modules(self) -> list[tuple[nn.Module, int]]:
        return [(self.vision_model, self.num_image_features), (self.aligner, self.num_image_features)]

    def encode_mm(self, mm_inputs: MultiModalInputs) -> torch.Tensor:
        """pixel_values [images, 3, H, W] -> [images * positions, hidden]"""
        return self.aligner(self.vision_model(mm_inputs["pixel_values"])).flatten(0, 1)

    def static_mm_item(self) -> MultiModalInputs:
        size = self.vision_config.image_size
        return {"pixel_values": torch.zeros(1, self.vision_config.num_channels, size, size)}

    def checkpoint_key(self, key: str) -> str | None:
        """Our name for a checkpoint tensor, or None for tensors never used (SigLIP's pooling head)."""
        key = canonical_key(key)
        if key.endswith(("position_ids", "rotary_emb.inv_freq")) or key.startswith("vision_model.head."):
            return None
        return key


class HybridAligner(nn.Module):
    """Each branch projected to half the decoder's width, [high-res, low-res] joined, GELU, a linear."""

    def __init__(self, low_res: int, high_res: int, hidden: int) -> None:
        super().__init__()
        self.vision_proj = LinearBase(low_res, hidden // 2, bias=True)
        self.high_res_vision_proj = LinearBase(high_res, hidden // 2, bias=True)
        self.act = Activation("gelu")
        self.proj = LinearBase(hidden, hidden, bias=True)

    def forward(self, low_res: torch.Tensor, high_res: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([self.high_res_vision_proj(high_res), self.vision_proj(low_res)], dim=-1)
        return self.proj(self.act(joined))


class HighResProjection(nn.Module):
    """SAM's feature map [batch, c, h, w] -> [batch, 4c, grid, grid]: resized to 4x SigLIP's grid, then two 3x3
    convolutions of stride 2."""

    def __init__(self, channels: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.conv1 = nn.Conv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.conv2 = nn.Conv2d(2 * channels, 4 * channels, kernel_size=3, stride=2, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(x, size=(4 * self.grid, 4 * self.grid), mode="bilinear", align_corners=False)
        return self.conv2(self.conv1(x))


class DeepseekVLHybridForConditionalGeneration(DeepseekVLForConditionalGeneration):
    @staticmethod
    def check_config(config: PretrainedConfig) -> None:
        DeepseekVLForConditionalGeneration.check_config(config)
        high_res = config.high_res_vision_config
        if getattr(high_res, "model_type", None) != "sam_vision_model":
            raise UserError(f"high_res_vision_config.model_type '{getattr(high_res, 'model_type', None)}' is not "
                            f"supported (supported: sam_vision_model)")
        check_sam_config(high_res, "high_res_vision_config")
        if config.text_config.hidden_size % 2:
            raise UserError(f"text_config.hidden_size {config.text_config.hidden_size} is odd: the hybrid aligner "
                            f"gives each branch half of it")

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        high_res = config.high_res_vision_config
        self.high_res_size = high_res.image_size
        self.global_layer = high_res.global_attn_indexes[0]
        grid = self.vision_config.image_size // self.vision_config.patch_size
        self.high_res_vision_model = SamVisionEncoder(high_res)
        self.high_res_vision_neck = SamNeck(high_res)
        self.high_res_vision_proj = HighResProjection(high_res.output_channels, grid)
        self.high_res_vision_alpha = nn.Parameter(torch.empty(1), requires_grad=False)

    def make_aligner(self, config: PretrainedConfig) -> nn.Module:
        return HybridAligner(config.vision_config.hidden_size, 4 * config.high_res_vision_config.output_channels,
                             config.text_config.hidden_size)

    def prompt_only_modules(self) -> list[tuple[nn.Module, int]]:
        grid = self.high_res_size // self.high_res_vision_model.patch_embed.projection.stride[0]
        return super().prompt_only_modules() + [(self.high_res_vision_model, grid * grid)]

    def encode_mm(self, mm_inputs: MultiModalInputs) -> torch.Tensor:
        """pixel_values [images, 3, H, W] and high_res_pixel_values [images, 3, H', W'] -> [images * positions,
        hidden]"""
        last, global_layer = self.high_res_vision_model(mm_inputs["high_res_pixel_values"], self.global_layer)
        fused = self.high_res_vision_proj(last) + \
            self.high_res_vision_proj(self.high_res_vision_neck(global_layer)) * self.high_res_vision_alpha
        high_res = fused.flatten(2).transpose(1, 2)  # [images, grid * grid, channels]
        return self.aligner(self.vision_model(mm_inputs["pixel_values"]), high_res).flatten(0, 1)

    def static_mm_item(self) -> MultiModalInputs:
        size = self.high_res_size
        return {**super().static_mm_item(), "high_res_pixel_values": torch.zeros(1, 3, size, size)}
