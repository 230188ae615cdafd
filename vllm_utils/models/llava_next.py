"""LLaVA-NeXT (HF `LlavaNextForConditionalGeneration`) and LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`):
LLaVA with images of any size. Each image is a base view of the whole picture plus tiles of its best-fitting
resolution, all through the vision tower; the tiles' features are laid out as the picture, cropped to its aspect
ratio (OneVision also shrinks grids of over `anyres_max_N` tiles), and each row ends with the learnt
`image_newline` embedding. A single view (one tile) is followed by one newline.

OneVision also takes videos: each frame through the tower and the projector, its feature grid pooled bilinearly to
half its side (rounded up), the frames one after another, then one newline for the whole video. A prompt's items
(images and videos) come in prompt order: `item_kinds` says which is which."""
import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.models.llava import LlavaForConditionalGeneration
from vllm_utils.multimodal.anyres import anyres_max_size, tile_grid, unpadded_size
from vllm_utils.multimodal.inputs import MultiModalInputs

_ANYRES_MAX = re.compile(r"^anyres_max_(\d+)$")


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    @staticmethod
    def check_config(config: PretrainedConfig) -> None:
        LlavaForConditionalGeneration.check_config(config)
        pinpoints = getattr(config, "image_grid_pinpoints", None)
        if not pinpoints or not all(len(p) == 2 for p in pinpoints):
            raise UserError(f"image_grid_pinpoints {pinpoints!r} is not a list of (height, width) resolutions")

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.pinpoints = config.image_grid_pinpoints
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size), requires_grad=False)

    def static_mm_item(self) -> None:
        return None  # images take as many tiles as their size asks

    def encode_mm(self, mm_inputs: MultiModalInputs) -> torch.Tensor:
        """pixel_values [tiles, 3, H, W] (each image's base view, then its tiles), image_sizes [images, 2] as
        (height, width), image_tiles [images]; with videos, pixel_values_videos [frames, 3, H, W], video_frames
        [videos] and item_kinds [items] (0: an image, 1: a video, in prompt order) -> [positions, hidden]."""
        images = []
        if len(mm_inputs["image_tiles"]):
            features = self.encode_images(mm_inputs["pixel_values"])
            per_image = features.split(mm_inputs["image_tiles"].tolist())
            images = [self.pack(f, tuple(size)) for f, size in zip(per_image, mm_inputs["image_sizes"].tolist())]
        if "item_kinds" not in mm_inputs:
            return torch.cat(images)
        frames = mm_inputs["pixel_values_videos"].split(mm_inputs["video_frames"].tolist())
        videos = iter([self.encode_video(f) for f in frames])
        images = iter(images)
        return torch.cat([next(videos) if kind else next(images) for kind in mm_inputs["item_kinds"].tolist()])

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """One video's frames [frames, 3, H, W] -> its prompt positions [positions, hidden]."""
        raise NotImplementedError(f"{type(self).__name__} takes no video")

    def pack(self, features: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """One image's features [tiles, per_tile, hidden] -> its prompt positions [positions, hidden]."""
        newline = self.image_newline.to(features.dtype)
        if features.shape[0] == 1:
            return torch.cat([features[0], newline[None]])
        side = self.vision_config.image_size // self.vision_config.patch_size
        rows, cols = tile_grid(image_size, self.pinpoints, self.vision_config.image_size)
        grid = features[1:].view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        height, width = unpadded_size(rows * side, cols * side, image_size)
        top, left = (grid.shape[1] - height) // 2, (grid.shape[2] - width) // 2
        grid = self.shrink(grid[:, top : top + height, left : left + width], side)
        grid = torch.cat([grid, newline[:, None, None].expand(-1, grid.shape[1], 1)], dim=-1)  # [hidden, h, w + 1]
        return torch.cat([features[0], grid.flatten(1, 2).T])

    def shrink(self, grid: torch.Tensor, side: int) -> torch.Tensor:
        """LLaVA-NeXT keeps the whole grid."""
        return grid


class LlavaOnevisionForConditionalGeneration(LlavaNextForConditionalGeneration):
    @staticmethod
    def check_config(config: PretrainedConfig) -> None:
        LlavaNextForConditionalGeneration.check_config(config)
        if not _ANYRES_MAX.match(str(getattr(config, "vision_aspect_ratio", ""))):
            raise UserError(f"vision_aspect_ratio {getattr(config, 'vision_aspect_ratio', None)!r} is not "
                            f"supported (supported: anyres_max_N)")

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.max_tiles = int(_ANYRES_MAX.match(config.vision_aspect_ratio).group(1))

    def shrink(self, grid: torch.Tensor, side: int) -> torch.Tensor:
        """Grids of more than ~`max_tiles` tiles' features are shrunk to about that, bilinearly."""
        size = anyres_max_size(grid.shape[1], grid.shape[2], self.max_tiles, side)
        return grid if size is None else F.interpolate(grid[None], list(size), mode="bilinear")[0]

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        features = self.encode_images(frames)  # [frames, side * side, hidden]
        side = self.vision_config.image_size // self.vision_config.patch_size
        grid = features.view(len(frames), side, side, -1).permute(0, 3, 1, 2)
        pooled = F.interpolate(grid, size=[math.ceil(side / 2)] * 2, mode="bilinear")
        rows = pooled.permute(0, 2, 3, 1).flatten(0, 2)
        return torch.cat([rows, self.image_newline.to(rows.dtype)[None]])
