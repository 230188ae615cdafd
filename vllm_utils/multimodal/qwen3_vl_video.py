"""Frames -> Qwen3-VL's video patches and the timestamps its prompt writes, as `Qwen3VLVideoProcessor` and
`Qwen3VLProcessor` compute them, without torchvision. The frames are taken as given (sampled already); one size for
the whole clip (the same `smart_resize` as GLM-4.1V's, counting the frames against the pixel limit), patched as
Qwen2-VL's (`glm4v_video.glm_video_patches`). Each temporal patch (two frames) is one picture of the prompt, written
`<{t:.1f} seconds>` (the mean time of its first and last frame) + `<|vision_start|>` + its positions +
`<|vision_end|>`."""
import json
import os

import numpy as np
import torch

from vllm_utils.errors import UserError
from vllm_utils.multimodal.glm4v_video import glm_video_patches

# Qwen3VLVideoProcessor's defaults where a folder's processor files say nothing
DEFAULT_SETTINGS = {"min_pixels": 128 * 32 * 32, "max_pixels": 32 * 32 * 768, "patch_size": 16,
                    "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def video_settings(folder: str) -> dict:
    """The video processor's settings where transformers looks for them (processor_config.json's video part,
    video_preprocessor_config.json), with Qwen3VLVideoProcessor's defaults."""
    settings = dict(DEFAULT_SETTINGS)
    for name, part in (("processor_config.json", "video_processor"), ("video_preprocessor_config.json", None)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            stored = json.load(f)
        stored = stored.get(part) if part else stored
        if not stored:
            continue
        size = stored.get("size") or {}
        settings["min_pixels"] = size.get("shortest_edge", settings["min_pixels"])
        settings["max_pixels"] = size.get("longest_edge", settings["max_pixels"])
        settings.update({k: stored[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                                  "image_std") if k in stored})
        break
    return settings


def qwen3_video_patches(frames: np.ndarray, settings: dict) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Qwen3-VL's `pixel_values_videos` rows and (grid_t, grid_h, grid_w) for uint8 RGB `frames` [T, H, W, 3]."""
    if len(frames) < settings["temporal_patch_size"]:
        raise UserError(f"a video of {len(frames)} frame(s): Qwen3-VL's video processor needs at least "
                        f"{settings['temporal_patch_size']}; sample more frames (--num-frames)")
    return glm_video_patches(frames, settings)


def frame_times(times: list[float], temporal: int) -> list[float]:
    """Each temporal patch's time, as Qwen3VLProcessor._calculate_timestamps: the frame times padded with the last
    to whole patches, then the mean of each patch's first and last."""
    times = list(times) + [times[-1]] * (-len(times) % temporal)
    return [(times[i] + times[i + temporal - 1]) / 2 for i in range(0, len(times), temporal)]


def video_text(times: list[float], grid: tuple[int, int, int], merge: int, temporal: int, video_token: str) -> str:
    """What Qwen3VLProcessor writes for a video's placeholder: per temporal patch its time, then its positions
    between the vision markers."""
    frame = video_token * (grid[1] * grid[2] // (merge * merge))
    return "".join(f"<{t:.1f} seconds><|vision_start|>{frame}<|vision_end|>"
                   for t in frame_times(times, temporal)[: grid[0]])
