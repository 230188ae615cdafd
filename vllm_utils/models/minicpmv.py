"""MiniCPM-V 4.6 (HF `MiniCPMV4_6ForConditionalGeneration`, openbmb/MiniCPM-V-4.6): an image is a thumbnail and
up to `max_slice_nums` slices of it (the processor's LLaVA-UHD grid, `multimodal/minicpmv.py`), every slice through
the SigLIP tower with its window merger (`minicpmv_vision.py`), then the merger: each 2x2 block of the tower's
output one position (LayerNorm, linear, GELU, linear) into Qwen3.5's hybrid decoder (`qwen3_5.py`: Gated DeltaNet
layers with a recurrent state per sequence, gated full attention). Positions are plain 1-D RoPE: token index, images
included (transformers passes none, and Qwen3.5's decoder then turns every multimodal row by the same index).
A video's frames are encoded as images are (transformers' `get_video_features` is `get_image_features` on them),
their features in the video token's positions.
In downsample_mode "16x" a slice of h x w patches takes h * w / 16 positions; in "4x" the window merger is skipped
and it takes h * w / 4.

MiniCPM-V 4.7 (`MiniCPMV4_7ForConditionalGeneration`, openbmb/MiniCPM-V-4.7-1B) is the same model on canvas M-RoPE
(`canvas_positions.py`): each picture or video frame laid on a 2-D canvas of the decoder's three interleaved
multimodal rows (its thumbnail stretched over its slices' grid, the markers `image_start_id` ... `newline_id` the
config names pinned to the canvas), so its positions read the prompt's token ids; the config has no
`drop_vision_last_layer`. Its processor differs only in writing a video without `<image_id>`."""
import math
import re

import torch
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.attention.metadata import AttentionMetadata
from vllm_utils.errors import UserError
from vllm_utils.layers.activation import Activation
from vllm_utils.layers.embedding import ParallelLMHead, embed_with_mm
from vllm_utils.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm_utils.models.canvas_positions import CanvasMarkers, canvas_positions
from vllm_utils.models.llama import PACKED_MODULES, MultimodalDecoderLM
from vllm_utils.models.minicpmv_vision import WINDOW, MiniCPMVisionModel, check_vision_config, window_order
from vllm_utils.models.qwen3_5 import Qwen3_5TextModel, text_spec
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.multimodal.minicpmv import downsample_divisor

# Checkpoint key prefixes -> ours: transformers 5's layout (the hub's: model.vision_tower.*, model.merger.*,
# model.language_model.*, lm_head.*), and the same without `model.` and with the window merger at the top (as
# conversions that strip the prefix write it).
_KEY_RULES = [
    (re.compile(r"^model\.(vision_tower|merger|language_model)\."), r"\1."),
    (re.compile(r"^vit_merger\."), "vision_tower.vit_merger."),
    (re.compile(r"^language_model\.model\."), "language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
]


class DownsampleMLP(nn.Module):
    """transformers' `MiniCPMV4_6DownsampleMLP`: a 2x2 block's four rows, normed, through a GELU (erf) MLP."""

    def __init__(self, hidden: int, out: int) -> None:
        super().__init__()
        merged = hidden * WINDOW * WINDOW
        self.pre_norm = nn.LayerNorm(merged, eps=1e-6)
        self.linear_1 = ColumnParallelLinear(merged, merged, bias=True)
        self.act = Activation("gelu")
        self.linear_2 = RowParallelLinear(merged, out, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.pre_norm(x))))


class MiniCPMVMerger(nn.Module):
    """One round (merger_times 1): each slice's 2x2 blocks, row-major, each one decoder position."""

    def __init__(self, hidden: int, out: int) -> None:
        super().__init__()
        self.mlp = nn.ModuleList([DownsampleMLP(hidden, out)])

    def forward(self, x: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        blocks = x[window_order(sizes).to(x.device)].view(-1, x.shape[-1] * WINDOW * WINDOW)
        return self.mlp[0](blocks)


class MiniCPMV4_6ForConditionalGeneration(MultimodalDecoderLM):
    packed_modules = PACKED_MODULES
    position_rows = 1
    config_type = "minicpmv4_6"

    @classmethod
    def check_config(cls, config: PretrainedConfig) -> None:
        """Refuses, by name, every configuration value this model does not implement."""
        if config.model_type != cls.config_type:
            raise UserError(f"model_type '{config.model_type}' is not supported here (supported: {cls.config_type})")
        check_vision_config(config.vision_config, config.insert_layer_id)
        text_spec(config.text_config)
        downsample_divisor(config)
        if list(config.merge_kernel_size) != [WINDOW, WINDOW]:
            raise UserError(f"merge_kernel_size = {list(config.merge_kernel_size)} is not supported (only [2, 2]: "
                            f"the merger's MLP takes four rows, and the processor counts positions so)")
        if config.merger_times != 1:
            raise UserError(f"merger_times = {config.merger_times} is not supported (only 1: the processor counts "
                            f"a slice's positions for one merge round)")
        if getattr(config, "drop_vision_last_layer", False):
            raise UserError("drop_vision_last_layer = True is not supported (transformers' model runs every "
                            "vision layer whatever it says)")
        if config.image_token_id is None:
            raise UserError("image_token_id is not set in the config; the model cannot find its image positions")

    @classmethod
    def tensor_parallel_widths(cls, config: PretrainedConfig) -> dict[str, int]:
        vision, text = config.vision_config, config.text_config
        return {**super().tensor_parallel_widths(config),
                "the linear-attention key heads": text.linear_num_key_heads,
                "the linear-attention value heads": text.linear_num_value_heads,
                "the vision attention heads": vision.num_attention_heads,
                "the vision MLP width": vision.intermediate_size,
                "the window merger width": vision.intermediate_size * WINDOW * WINDOW,
                "the merger width": vision.hidden_size * WINDOW * WINDOW}

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.check_config(config)
        vision, text = config.vision_config, config.text_config
        # a video's frames go through the tower as images do, into the video token's positions
        video = getattr(config, "video_token_id", None)
        self.mm_token_ids = (config.image_token_id,) + ((video,) if video is not None else ())
        window_merger = downsample_divisor(config) == 16
        self.vision_tower = MiniCPMVisionModel(vision, config.insert_layer_id, window_merger)
        self.merger = MiniCPMVMerger(vision.hidden_size, text.hidden_size)
        self.language_model = Qwen3_5TextModel(text)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        if getattr(config, "tie_word_embeddings", False):  # as transformers ties (the loader unties a checkpoint's
            self.lm_head.weight = self.language_model.embed_tokens.weight  # own lm_head, as transformers does)

    def prompt_only_modules(self) -> list[tuple[nn.Module, int]]:
        return [(self.vision_tower, 1024), (self.merger, 64)]

    def static_mm_item(self) -> None:
        return None  # an image's slices vary in number and shape

    def encode_mm(self, mm_inputs: MultiModalInputs) -> torch.Tensor:
        """pixel_values [patches, 3, p, p] (every slice's patches, row-major, slices in order), target_sizes
        [slices, 2] -> [positions, hidden]: each slice's merged 2x2 blocks, row-major, slices in order."""
        sizes = [(int(h), int(w)) for h, w in mm_inputs["target_sizes"].tolist()]
        features, sizes = self.vision_tower(mm_inputs["pixel_values"], sizes)
        return self.merger(features, sizes)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                mm_embeds: torch.Tensor | None = None, mm_mask: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        embeds = embed_with_mm(self.language_model.embed_tokens, input_ids, mm_embeds, mm_mask)
        return self.language_model(positions, embeds, meta, [], keep)

    def checkpoint_key(self, key: str) -> str | None:
        """Our name for a checkpoint tensor, or None for those never used (the multi-token-prediction head)."""
        for pattern, replacement in _KEY_RULES:
            key = pattern.sub(replacement, key)
        if key.startswith(("mtp.", "model.mtp.")) or key.endswith("rotary_emb.inv_freq"):
            return None
        return key


# the config's ids of the markers canvas M-RoPE pins, in CanvasMarkers' order
CANVAS_MARKERS = ("image_start_id", "image_end_id", "slice_start_id", "slice_end_id", "newline_id")


class MiniCPMV4_7ForConditionalGeneration(MiniCPMV4_6ForConditionalGeneration):
    """4.6's tower, merger and decoder; a prompt's positions are three rows laid out on each frame's canvas."""
    position_rows = 3
    config_type = "minicpmv4_7"

    @classmethod
    def check_config(cls, config: PretrainedConfig) -> None:
        super().check_config(config)
        for name in CANVAS_MARKERS:
            if getattr(config, name, None) is None:
                raise UserError(f"{name} is not set in the config; canvas M-RoPE pins that marker to each image's "
                                f"canvas and cannot lay out the prompt's positions without it")

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.markers = CanvasMarkers(*(getattr(config, name) for name in CANVAS_MARKERS))
        self.merge = math.isqrt(downsample_divisor(config))  # patches a position merges along a side
        self.max_positions = config.text_config.max_position_embeddings

    def rope_positions(self, is_mm: list[bool], mm_inputs: MultiModalInputs | None,
                       token_ids: list[int] | None = None) -> tuple[torch.Tensor, int]:
        """The canvas rows of the prompt `token_ids`: each item's slices (`target_sizes`, in prompt order) placed
        on its frame's canvas, the markers around them pinned to it."""
        if token_ids is None:
            raise ValueError("MiniCPM-V 4.7's positions are laid out from the prompt's token ids: pass token_ids")
        video = self.mm_token_ids[1] if len(self.mm_token_ids) > 1 else None
        kinds = [(2 if t == video else 1) if m else 0 for t, m in zip(token_ids, is_mm)]
        sizes = [(h, w) for h, w in mm_inputs["target_sizes"].tolist()] if mm_inputs else []
        return canvas_positions(list(token_ids), kinds, sizes, self.markers, self.merge, self.max_positions)
