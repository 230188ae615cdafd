"""GOT-OCR2: SAM's ViTDet encoder (`sam_vision.py`) on 1024-pixel pages -> two stride-2 convolutions and a linear
(the projector) -> a Qwen2 decoder. Each page takes (grid / 4)^2 prompt positions (256 at 1024 pixels)."""
import torch
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.layers.embedding import ParallelLMHead
from vllm_utils.layers.linear import LinearBase
from vllm_utils.models.llama import PACKED_MODULES, LlamaModel, MultimodalDecoderLM
from vllm_utils.models.llava import canonical_key
from vllm_utils.models.sam_vision import SamVisionEncoder, check_sam_config
from vllm_utils.models.text_backbones import decoder_spec
from vllm_utils.multimodal.got_ocr2 import page_positions
from vllm_utils.multimodal.inputs import MultiModalInputs


class GotOcr2Projector(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv_upsampler1 = nn.Conv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.conv_upsampler2 = nn.Conv2d(2 * channels, hidden, kernel_size=3, stride=2, padding=1, bias=False)
        self.multimodal_projector = LinearBase(hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[pages, channels, grid, grid] -> [pages, positions, hidden]"""
        x = self.conv_upsampler2(self.conv_upsampler1(x))
        return self.multimodal_projector(x.flatten(2).transpose(1, 2))


class GotOcr2ForConditionalGeneration(MultimodalDecoderLM):
    packed_modules = PACKED_MODULES
    position_rows = 1

    @staticmethod
    def check_config(config: PretrainedConfig) -> None:
        """Refuses, by name, every configuration value this model does not implement."""
        vision = config.vision_config
        if getattr(vision, "model_type", None) not in ("got_ocr2_vision", ""):
            raise UserError(f"vision_config.model_type '{getattr(vision, 'model_type', None)}' is not supported "
                            f"(supported: got_ocr2_vision)")
        check_sam_config(vision, "vision_config", need_global=False)
        decoder_spec(config.text_config)

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.check_config(config)
        vision, text = config.vision_config, config.text_config
        self.vision_config = vision
        self.mm_token_ids = (config.image_token_index,)
        self.num_image_features = page_positions(vision)
        self.vision_tower = SamVisionEncoder(vision)
        self.multi_modal_projector = GotOcr2Projector(vision.output_channels, text.hidden_size)
        self.language_model = LlamaModel(text)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        if getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False):
            self.lm_head.weight = self.language_model.embed_tokens.weight

    def prompt_only_modules(self) -> list[tuple[nn.Module, int]]:
        grid = self.vision_config.image_size // self.vision_config.patch_size
        return [(self.vision_tower, grid * grid), (self.multi_modal_projector, self.num_image_features)]

    def encode_mm(self, mm_inputs: MultiModalInputs) -> torch.Tensor:
        """pixel_values [pages, 3, H, W] -> [pages * positions, hidden]"""
        return self.multi_modal_projector(self.vision_tower(mm_inputs["pixel_values"])[0]).flatten(0, 1)

    def static_mm_item(self) -> MultiModalInputs:
        size = self.vision_config.image_size
        return {"pixel_values": torch.zeros(1, self.vision_config.num_channels, size, size)}

    def checkpoint_key(self, key: str) -> str | None:
        key = canonical_key(key)
        if key.endswith(("position_ids", "rotary_emb.inv_freq")):
            return None
        return key
