"""Video files -> uniformly sampled RGB frames, and frames -> Qwen2-VL's video patches.

`load_video` decodes with PyAV (an optional dependency: `pip install 'vllm_utils[video]'`) and samples frames the
way transformers' video loaders do by default: frame i*total//num_frames for i < num_frames, the same frames
`transformers.video_utils.load_video(path, num_frames=...)` returns.

`qwen_video_patches` computes what `Qwen2VLVideoProcessor` computes, without torchvision: each frame goes through
the steps of transformers' PIL image processor for Qwen2-VL (`Qwen2VLImageProcessorPil`: PIL bicubic resize to the
`smart_resize` size, rescale in float64 rounded to float32, normalize in float32), so a clip of one repeated
picture gives exactly that image processor's `pixel_values`. The torchvision video processor resizes with
torchvision's antialiased bicubic and fuses rescale with normalize, so where frames are resized its values can
differ by a uint8 level or so (tests/test_video.py compares them where torchvision is installed).
"""
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vllm_utils.errors import UserError

MAX_FRAMES = 768  # Qwen2-VL's max_frames
DEFAULT_NUM_FRAMES = 16  # frames sampled from a video unless --num-frames says otherwise
BLACK_VIDEO_FPS = 2.0  # the rate qwen-vl-utils samples videos at by default, so a synthetic clip looks like a sampled one
RESCALE_FACTOR = 1 / 255  # Qwen2-VL's rescale_factor (0.00392156862745098)
_FIX = "pass --input-video a video file PyAV/FFmpeg can decode (MP4, WebM, MKV, ...)"


@dataclass
class VideoClip:
    """Frames sampled from a video: `frames` uint8 [T, H, W, 3] RGB; `fps` and `total_frames` of the whole file."""
    frames: np.ndarray
    fps: float
    total_frames: int

    @property
    def sampled_fps(self) -> float:
        """The rate of the sampled frames (as transformers' VideoMetadata.sampled_fps)."""
        return len(self.frames) / self.total_frames * self.fps


def check_num_frames(num_frames: int) -> None:
    """Refuse a frame count Qwen2-VL cannot take, before anything is loaded."""
    if not 1 <= num_frames <= MAX_FRAMES:
        raise UserError(f"--num-frames must be between 1 and {MAX_FRAMES} (Qwen2-VL's max_frames), got {num_frames}")


def sample_indices(total_frames: int, num_frames: int) -> np.ndarray:
    """`num_frames` frame indices spread uniformly over the clip, starting at frame 0: floor(i * total / num_frames),
    in integers as transformers' `default_sample_indices_fn`. (Qwen2VLVideoProcessor.sample_frames' float32
    `arange(0, total, total / num_frames)` gives these too, but for some counts one more, equal to `total`.)"""
    return np.arange(num_frames) * total_frames // num_frames


def load_video(path: str, num_frames: int) -> VideoClip:
    """`num_frames` frames sampled uniformly over the video file `path`; a UserError names what is wrong."""
    try:
        import av
    except ImportError:
        raise UserError("--input-video needs PyAV: pip install av (or pip install 'vllm_utils[video]')") from None
    if num_frames < 1:
        raise UserError(f"cannot sample {num_frames} frames from video '{path}'; ask for at least 1 (--num-frames)")
    if os.path.isdir(path):
        raise UserError(f"video '{path}' is a folder, not a file; {_FIX}")
    if not os.path.isfile(path):
        raise UserError(f"video '{path}' does not exist; {_FIX}")
    try:
        return _load(av, path, num_frames)
    except PermissionError:  # av's own PermissionError subclasses both this and FFmpegError
        raise UserError(f"video '{path}' is not readable (permission denied); fix its permissions") from None
    except av.FFmpegError as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise UserError(f"cannot decode video '{path}' ({reason}); {_FIX}") from None


def _load(av, path: str, num_frames: int) -> VideoClip:
    with av.open(path) as container:
        if not container.streams.video:
            raise UserError(f"'{path}' has no video stream; {_FIX}")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        total = stream.frames
    if not rate:
        raise UserError(f"video '{path}' does not give its frame rate; re-encode it (e.g. ffmpeg -i IN -r 30 OUT.mp4)")
    if total <= 0:  # the container does not store the count (Matroska/WebM, some streams): count by decoding
        total = sum(1 for _ in _decode(path))
    frames, decoded = _pick(path, total, num_frames)
    if len(frames) < num_frames:  # the header promised more frames than decode: sample over those there are
        total = decoded
        frames, _ = _pick(path, total, num_frames)
    if len({frame.shape for frame in frames}) > 1:
        raise UserError(f"video '{path}' changes its frame size mid-stream; re-encode it to one size")
    return VideoClip(np.stack(frames), float(rate), total)


def _decode(path: str) -> Iterator:
    """The video frames of `path`, in presentation order, from the start."""
    import av

    with av.open(path) as container:
        yield from container.decode(video=0)


def _pick(path: str, total: int, num_frames: int) -> tuple[list[np.ndarray], int]:
    """The RGB frames at the sampled indices, and how many frames were decoded to find them."""
    if total == 0:
        raise UserError(f"video '{path}' has no frames; {_FIX}")
    if total < num_frames:
        raise UserError(f"video '{path}' has {total} frame{'s' * (total > 1)}, fewer than the {num_frames} asked "
                        f"for; pass --num-frames {total} or less")
    wanted = set(sample_indices(total, num_frames).tolist())
    last = max(wanted)
    picked, decoded = [], 0
    for index, frame in enumerate(_decode(path)):
        decoded = index + 1
        if index in wanted:
            picked.append(frame.to_ndarray(format="rgb24"))
        if index == last:
            break
    return picked, decoded


def black_video(num_frames: int, height: int, width: int) -> VideoClip:
    """A synthetic all-black clip for --perf, at BLACK_VIDEO_FPS: `num_frames` frames that are the whole clip."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    return VideoClip(frames, BLACK_VIDEO_FPS, num_frames)


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
