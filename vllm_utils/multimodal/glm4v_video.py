"""Frames -> GLM-4.1V's video patches and the frame times its prompt writes, as `Glm4vVideoProcessor` and
`Glm4vProcessor` compute them, without torchvision. The frames are taken as given (sampled already: a decoded file's
frames, or frames handed over); one size for the whole clip (`smart_resize` counting its frames against the pixel
limit), each frame resized with PIL's bicubic and patched as Qwen2-VL's (`qwen2_vl_video.py`: the same steps, the
same row layout). Each temporal patch (two frames) is one frame of the prompt, written
`<|begin_of_image|>` + its positions + `<|end_of_image|>` + the whole second of its first frame."""
import json
import os

import numpy as np
import torch
from PIL import Image

from vllm_utils.errors import UserError
from vllm_utils.multimodal.qwen2_vl_video import qwen_video_patches
from vllm_utils.multimodal.video import VideoClip, sample_indices

UNTIMED_FPS = 24.0  # transformers' frame rate for frames given without one
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# Glm4vVideoProcessor's defaults where a folder's processor files say nothing
DEFAULT_SETTINGS = {"min_pixels": 112 * 112, "max_pixels": 28 * 28 * 2 * 30000, "patch_size": 14,
                    "temporal_patch_size": 2, "merge_size": 2, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD}


def video_settings(folder: str) -> dict:
    """The video processor's settings where transformers looks for them (processor_config.json's video part,
    video_preprocessor_config.json, else the image processor's file), with Glm4vVideoProcessor's defaults."""
    settings = dict(DEFAULT_SETTINGS)
    for name, part in (("processor_config.json", "video_processor"), ("video_preprocessor_config.json", None),
                       ("preprocessor_config.json", None)):
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


def clip_frames(video: VideoClip | np.ndarray | list) -> tuple[np.ndarray, list[float]]:
    """uint8 frames [T, H, W, 3] and each frame's time in seconds: a VideoClip's from the indices its frames were
    sampled at and the file's rate; frames given without a rate as transformers takes them (24 a second)."""
    if isinstance(video, VideoClip):
        indices = sample_indices(video.total_frames, len(video.frames))
        return video.frames, [int(i) / video.fps for i in indices]
    frames = np.stack([np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f) for f in video])
    return frames, [i / UNTIMED_FPS for i in range(len(frames))]


def glm_video_patches(frames: np.ndarray, settings: dict) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """GLM-4.1V's `pixel_values_videos` rows and (grid_t, grid_h, grid_w) for uint8 RGB `frames` [T, H, W, 3]."""
    from transformers.models.glm4v.image_processing_pil_glm4v import smart_resize

    temporal, factor = settings["temporal_patch_size"], settings["patch_size"] * settings["merge_size"]
    if len(frames) < temporal:
        raise UserError(f"a video of {len(frames)} frame(s): GLM-4.1V's video processor needs at least {temporal}; "
                        f"sample more frames (--num-frames)")
    height, width = frames.shape[1:3]
    try:
        new_h, new_w = smart_resize(len(frames), height, width, temporal_factor=temporal, factor=factor,
                                    min_pixels=settings["min_pixels"], max_pixels=settings["max_pixels"])
    except ValueError as e:
        raise UserError(f"video frames of {width} x {height} pixels: {e}; crop or pad the video") from None
    resized = np.stack([np.asarray(Image.fromarray(f).resize((new_w, new_h), Image.Resampling.BICUBIC))
                        for f in frames])
    # already at their size: Qwen2-VL's patching keeps it (PIL copies a resize to the same size)
    return qwen_video_patches(resized, min_pixels=new_h * new_w, max_pixels=new_h * new_w,
                              patch_size=settings["patch_size"], temporal_patch_size=temporal,
                              merge_size=settings["merge_size"], mean=settings["image_mean"],
                              std=settings["image_std"])


def video_text(times: list[float], grid: tuple[int, int, int], merge: int, image_token: str) -> str:
    """What Glm4vProcessor writes for a video's placeholder: per temporal patch, its positions between the image
    markers, then the whole second of its first frame (the last time repeated where frames run short)."""
    grid_t, grid_h, grid_w = grid
    starts = times[::2][:grid_t]
    starts += [starts[-1] if starts else 0] * (grid_t - len(starts))
    frame = image_token * (grid_h * grid_w // (merge * merge))
    return "".join(f"<|begin_of_image|>{frame}<|end_of_image|>{int(t)}" for t in starts)
