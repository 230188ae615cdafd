"""Video files -> uniformly sampled RGB frames (a family's adapter patches them: `qwen2_vl_video.py`).

`load_video` decodes with PyAV (an optional dependency: `pip install 'vllm_utils[video]'`) and samples frames the
way transformers' video loaders do by default: frame i*total//num_frames for i < num_frames, the same frames
`transformers.video_utils.load_video(path, num_frames=...)` returns.
"""
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from vllm_utils.errors import UserError

MAX_FRAMES = 768  # Qwen2-VL's max_frames
DEFAULT_NUM_FRAMES = 16  # frames sampled from a video unless --num-frames says otherwise
BLACK_VIDEO_FPS = 2.0  # the rate qwen-vl-utils samples videos at by default, so a synthetic clip looks like a sampled one
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


def load_video(path: str, num_frames: int, at_most: bool = False, fix: str = _FIX) -> VideoClip:
    """`num_frames` frames sampled uniformly over the video file `path` (`at_most`: every frame of a shorter clip);
    a UserError names what is wrong, and `fix` what to do about it."""
    try:
        import av
    except ImportError:
        raise UserError("--input-video needs PyAV: pip install av (or pip install 'vllm_utils[video]')") from None
    if num_frames < 1:
        raise UserError(f"cannot sample {num_frames} frames from video '{path}'; ask for at least 1 (--num-frames)")
    if os.path.isdir(path):
        raise UserError(f"video '{path}' is a folder, not a file; {fix}")
    if not os.path.isfile(path):
        raise UserError(f"video '{path}' does not exist; {fix}")
    try:
        return _load(av, path, num_frames, at_most, fix)
    except PermissionError:  # av's own PermissionError subclasses both this and FFmpegError
        raise UserError(f"video '{path}' is not readable (permission denied); fix its permissions") from None
    except av.FFmpegError as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise UserError(f"cannot decode video '{path}' ({reason}); {fix}") from None


def _load(av, path: str, num_frames: int, at_most: bool, fix: str) -> VideoClip:
    with av.open(path) as container:
        if not container.streams.video:
            raise UserError(f"'{path}' has no video stream; {fix}")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        total = stream.frames
    if not rate:
        raise UserError(f"video '{path}' does not give its frame rate; re-encode it (e.g. ffmpeg -i IN -r 30 OUT.mp4)")
    if total <= 0:  # the container does not store the count (Matroska/WebM, some streams): count by decoding
        total = sum(1 for _ in _decode(path))
    if at_most:
        num_frames = max(1, min(num_frames, total))
    frames, decoded = _pick(path, total, num_frames, fix)
    if len(frames) < num_frames:  # the header promised more frames than decode: sample over those there are
        total = decoded
        num_frames = max(1, min(num_frames, total)) if at_most else num_frames
        frames, _ = _pick(path, total, num_frames, fix)
    if len({frame.shape for frame in frames}) > 1:
        raise UserError(f"video '{path}' changes its frame size mid-stream; re-encode it to one size")
    return VideoClip(np.stack(frames), float(rate), total)


def _decode(path: str) -> Iterator:
    """The video frames of `path`, in presentation order, from the start."""
    import av

    with av.open(path) as container:
        yield from container.decode(video=0)


def _pick(path: str, total: int, num_frames: int, fix: str) -> tuple[list[np.ndarray], int]:
    """The RGB frames at the sampled indices, and how many frames were decoded to find them."""
    if total == 0:
        raise UserError(f"video '{path}' has no frames; {fix}")
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
