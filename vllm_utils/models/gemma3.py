"""Gemma 3: SigLIP's last hidden state (after post_layernorm) average-pooled from its patch grid to
`mm_tokens_per_image` positions (64 x 64 patches -> 16 x 16 on the hub), each row normed by Gemma's RMSNorm and
multiplied by `mm_input_projection_weight`, into the Gemma 3 decoder (`gemma3_text.py`). The positions of one image
attend to each other both ways (`bidirectional_mm`: the engine gives every run of them that), as transformers'
token_type_ids mask does."""
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.layers.activation import check_activation
from vllm_utils.layers.embedding import ParallelLMHead
from vllm_utils.layers.norm import GemmaRMSNorm
from vllm_utils.models.gemma3_text import Gemma3TextModel, check_gemma3_text
from vllm_utils.models.llama import PACKED_MODULES, MultimodalDecoderLM
from vllm_utils.models.llava import canonical_key
from vllm_utils.models.siglip import SiglipVisionModel
from vllm_utils.multimodal.inputs import MultiModalInputs


def pooling(config: PretrainedConfig) -> tuple[int, int]:
    """(patches a side, pooling kernel): the tower's patch grid side, and the kernel of the average pooling that
    makes it `mm_tokens_per_image` positions (a square grid the kernel divides)."""
    vision, tokens = config.vision_config, config.mm_tokens_per_image
    side = vision.image_size // vision.patch_size
    tokens_side = round(tokens**0.5)
    if tokens_side * tokens_side != tokens or side % tokens_side:
        raise UserError(f"mm_tokens_per_image {tokens} is not supported: it must be a square whose side divides the "
                        f"vision tower's {side} x {side} patch grid (image_size {vision.image_size} / patch_size "
                        f"{vision.patch_size})")
    return side, side // tokens_side


class Gemma3MultiModalProjector(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        vision, text = config.vision_config, config.text_config
        self.side, self.kernel = pooling(config)
        self.mm_soft_emb_norm = GemmaRMSNorm(vision.hidden_size, vision.layer_norm_eps)
        self.mm_input_projection_weight = nn.Parameter(torch.empty(vision.hidden_size, text.hidden_size),
                                                       requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[images, patches, vision hidden] -> [images, mm_tokens_per_image, text hidden]"""
        images, _, hidden = x.shape
        grid = x.transpose(1, 2).reshape(images, hidden, self.side, self.side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight).type_as(x)


class Gemma3ForConditionalGeneration(MultimodalDecoderLM):
    packed_modules = PACKED_MODULES
    position_rows = 1
    bidirectional_mm: ClassVar[bool] = True  # an image's positions see each other, whatever their order

    @staticmethod
    def check_config(config: PretrainedConfig) -> None:
        """Refuses, by name, every configuration value this model does not implement."""
        vision = config.vision_config
        if getattr(vision, "model_type", None) != "siglip_vision_model":
            raise UserError(f"vision_config.model_type '{getattr(vision, 'model_type', None)}' is not supported "
                            f"(supported: siglip_vision_model)")
        check_activation(vision.hidden_act, "vision_config.hidden_act")
        pooling(config)
        check_gemma3_text(config.text_config)

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
        self.mm_token_ids = (config.image_token_index,)
        self.num_image_features = config.mm_tokens_per_image
        self.vision_tower = SiglipVisionModel(vision)
        self.multi_modal_projector = Gemma3MultiModalProjector(config)
        self.language_model = Gemma3TextModel(text)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        if getattr(config, "tie_word_embeddings", True) or getattr(text, "tie_word_embeddings", False):
            self.lm_head.weight = self.language_model.embed_tokens.weight

    def prompt_only_modules(self) -> list[tuple[nn.Module, int]]:
        patches = (self.vision_config.image_size // self.vision_config.patch_size) ** 2
        return [(self.vision_tower, patches), (self.multi_modal_projector, self.num_image_features)]

    def encode_mm(self, mm_inputs: MultiModalInputs) -> torch.Tensor:
        """pixel_values [images and their crops, 3, H, W] -> [rows * mm_tokens_per_image, hidden]"""
        return self.multi_modal_projector(self.vision_tower(mm_inputs["pixel_values"])).flatten(0, 1)

    def static_mm_item(self) -> MultiModalInputs:
        """One image without pan and scan (its crops make an item of several rows, encoded eagerly)."""
        size = self.vision_config.image_size
        return {"pixel_values": torch.zeros(1, self.vision_config.num_channels, size, size)}

    def checkpoint_key(self, key: str) -> str | None:
        """Our name for a checkpoint tensor (the hub's transformers 4.5x layout or transformers 5's), or None for
        tensors Gemma 3 never uses (SigLIP's pooling head, RoPE's tables)."""
        key = canonical_key(key)
        if key.endswith(("position_ids", "rotary_emb.inv_freq")) or key.startswith("vision_tower.head."):
            return None
        return key
