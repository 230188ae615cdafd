"""Frames -> Qwen2-VL's video patches, as `Qwen2VLVideoProcessor` computes them, without torchvision: each frame
goes through the steps of transformers' PIL image processor for Qwen2-VL (`Qwen2VLImageProcessorPil`: PIL bicubic
resize to the `smart_resize` size, rescale in float64 rounded to float32, normalize in float32), so a clip of one
repeated picture gives exactly that image processor's `pixel_values`. The torchvision video processor resizes with
torchvision's antialiased bicubic and fuses rescale with normalize, so where frames are resized its values can
differ by a uint8 level or so (tests/test_video.py compares them where torchvision is installed)."""
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from vllm_utils.errors import UserError

RESCALE_FACTOR = 1 / 255  # Qwen2-VL's rescale_factor (0.00392156862745098)


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize target: both sides multiples of `factor`, the area within [min_pixels, max_pixels] where it
    can be, the aspect ratio kept as well as that allows. The float operations are in transformers' order so that
    the rounding, and so the size, is the same."""
    if max(height, width) / min(height, width) > 200:
        raise UserError(f"video frames are {width}x{height} pixels, an aspect ratio above 200, which Qwen2-VL "
                        f"refuses; crop or pad the video")
    new_h, new_w = round(height / factor) * factor, round(width / factor) * factor
    if new_h * new_w > max_pixels:  # shrink to fit, rounding down
        shrink = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / shrink / factor) * factor)
        new_w = max(factor, math.floor(width / shrink / factor) * factor)
    elif new_h * new_w < min_pixels:  # grow to fill, rounding up
        grow = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * grow / factor) * factor
        new_w = math.ceil(width * grow / factor) * factor
    if new_h == 0 or new_w == 0:  # only with min_pixels < 1: a side rounded to nothing and nothing grew it
        raise UserError(f"video frames of {width}x{height} pixels resize to less than one {factor}x{factor} patch; "
                        f"use larger frames or a larger min_pixels")
    return new_h, new_w


def qwen_video_patches(frames: np.ndarray, *, min_pixels: int, max_pixels: int, patch_size: int = 14,
                       temporal_patch_size: int = 2, merge_size: int = 2, mean: Sequence[float],
                       std: Sequence[float]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Qwen2-VL's `pixel_values_videos` rows [grid_t*grid_h*grid_w, 3*temporal_patch_size*patch_size**2] float32 for
    the uint8 RGB `frames` [T, H, W, 3], and (grid_t, grid_h, grid_w)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or 0 in frames.shape:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T, H, W >= 1, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    new_h, new_w = smart_resize(height, width, factor=patch_size * merge_size, min_pixels=min_pixels,
                                max_pixels=max_pixels)
    # the temporal patch needs whole groups of frames: repeat the last frame to fill the last group
    num_slots = -(-len(frames) // temporal_patch_size) * temporal_patch_size
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    pixels = np.empty((num_slots, new_h, new_w, 3), np.float32)
    for slot in range(num_slots):
        if slot < len(frames):  # a repeated frame gives the same pixels: copy them rather than recompute
            # PIL's bicubic on uint8, like the PIL backend (which also resizes when the size is unchanged: a copy)
            resized = np.asarray(Image.fromarray(frames[slot]).resize((new_w, new_h), Image.Resampling.BICUBIC))
            # the PIL backend's dtypes: rescale in float64 then round to float32; normalize in float32
            scaled = (resized.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
            pixels[slot] = (scaled - mean32) / std32
        else:
            pixels[slot] = pixels[len(frames) - 1]
    grid_t, grid_h, grid_w = num_slots // temporal_patch_size, new_h // patch_size, new_w // patch_size
    # split each axis into (group, position-in-group): time into temporal patches, each side into merge windows of
    # patches of pixels; rows go window by window (row-major), patch by patch within a window, and each row holds
    # channel, then time, then the pixels of the patch
    pixels = pixels.reshape(grid_t, temporal_patch_size, grid_h // merge_size, merge_size, patch_size,
                            grid_w // merge_size, merge_size, patch_size, 3)
    rows = pixels.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7).reshape(grid_t * grid_h * grid_w, -1)
    return torch.from_numpy(rows), (grid_t, grid_h, grid_w)
