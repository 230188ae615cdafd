"""Video files as transformers' PyAV loader samples them, Qwen2-VL's video patches as its processors compute them,
and bad video input told in one line."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.video_utils import VideoMetadata, default_sample_indices_fn

from vllm_utils.errors import UserError
from vllm_utils.multimodal.qwen2_vl_video import qwen_video_patches
from vllm_utils.multimodal.video import (BLACK_VIDEO_FPS, MAX_FRAMES, VideoClip, black_video, check_num_frames,
                                         load_video, sample_indices)

W, H, FRAMES, FPS = 64, 48, 12, 12
STEP = 16  # brightness added per frame: far more than codec loss, so a decoded frame's mean names its index
CODEC_LOSS = 12  # the largest per-pixel difference allowed between a written and a decoded frame
PATCH = dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)


def _frames(n: int = FRAMES, w: int = W, h: int = H) -> np.ndarray:
    """Smooth colour gradients (codecs keep those well), each frame brighter than the last by STEP."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 60 // w, y * 60 // h, (x + y) * 40 // (w + h)], axis=-1)
    return np.stack([base + 20 + i * STEP for i in range(n)]).astype(np.uint8)


def _write(path, frames: np.ndarray, fps: int = FPS) -> None:
    av = pytest.importorskip("av")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.bit_rate = 4_000_000
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())  # flush


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    _write(path, _frames())
    return str(path)


def _indices_by_brightness(clip: VideoClip) -> list[int]:
    written = _frames().reshape(FRAMES, -1).mean(axis=1)
    return [int(np.abs(written - frame.mean()).argmin()) for frame in clip.frames]


@pytest.mark.parametrize("num_frames", [1, 5, 8, FRAMES])
def test_samples_uniformly_like_transformers(mp4, num_frames):
    from transformers.video_utils import load_video as hf_load_video

    clip = load_video(mp4, num_frames)
    expected = (np.arange(num_frames) * FRAMES // num_frames).tolist()
    assert clip.frames.shape == (num_frames, H, W, 3) and clip.frames.dtype == np.uint8
    assert _indices_by_brightness(clip) == expected
    assert np.abs(clip.frames.astype(int) - _frames()[expected]).max() <= CODEC_LOSS
    assert (clip.fps, clip.total_frames) == (FPS, FRAMES)
    assert clip.sampled_fps == pytest.approx(num_frames / FRAMES * FPS)
    hf_frames, metadata = hf_load_video(mp4, num_frames=num_frames, backend="pyav")
    np.testing.assert_array_equal(clip.frames, hf_frames)
    assert clip.sampled_fps == pytest.approx(metadata.sampled_fps)


def test_counts_frames_when_the_container_does_not(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mkv"
    _write(path, _frames())
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # else this test tests nothing
    clip = load_video(str(path), 5)
    assert clip.total_frames == FRAMES and _indices_by_brightness(clip) == [0, 2, 4, 7, 9]


def test_sample_indices_match_transformers():
    for total in range(1, 80):
        for n in range(1, total + 1):
            hf = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=30.0), num_frames=n)
            np.testing.assert_array_equal(sample_indices(total, n), hf)


def _one_line_error(*args) -> str:
    with pytest.raises(UserError) as caught:
        load_video(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_shorter_clip_gives_every_frame_when_no_count_was_asked(mp4):
    """--num-frames left out: up to 16 frames, and every frame of a shorter clip (12 here), rather than an error."""
    clip = load_video(mp4, FRAMES + 4, at_most=True)
    assert clip.frames.shape[0] == FRAMES and _indices_by_brightness(clip) == list(range(FRAMES))


def test_bad_video_input_is_one_line(mp4, tmp_path):
    pytest.importorskip("av")
    assert "does not exist" in _one_line_error(str(tmp_path / "missing.mp4"), 4)
    assert "is a folder" in _one_line_error(str(tmp_path), 4)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 20)
    assert "cannot decode video" in _one_line_error(str(text), 4)
    assert f"has {FRAMES} frames" in _one_line_error(mp4, FRAMES + 1)
    assert f"--num-frames {FRAMES} or less" in _one_line_error(mp4, FRAMES + 1)
    assert "at least 1" in _one_line_error(mp4, 0)


def test_audio_only_file_has_no_video_stream(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "sound.wav"
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    assert "has no video stream" in _one_line_error(str(path), 1)


def test_missing_pyav_is_one_line(monkeypatch, mp4):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    assert "pip install av" in _one_line_error(mp4, 4)


def test_check_num_frames():
    check_num_frames(1)
    check_num_frames(MAX_FRAMES)
    for bad in (0, -3, MAX_FRAMES + 1):
        with pytest.raises(UserError, match="between 1 and 768"):
            check_num_frames(bad)


def test_black_video():
    clip = black_video(6, 56, 84)
    assert clip.frames.shape == (6, 56, 84, 3) and clip.frames.dtype == np.uint8 and not clip.frames.any()
    assert clip.fps == clip.sampled_fps == BLACK_VIDEO_FPS and clip.total_frames == 6


def _hf_image(picture: np.ndarray, min_pixels: int, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Qwen2-VL's PIL image processor: rows [N, 3*2*14*14] with the picture in both temporal slots, and its grid."""
    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    out = processor(images=[Image.fromarray(picture)], return_tensors="np")
    (t, grid_h, grid_w), = out["image_grid_thw"].tolist()
    assert t == 1
    return out["pixel_values"], (grid_h, grid_w)


def _picture(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# (height, width, min_pixels, max_pixels): rounding only; shrinking to max_pixels; growing to min_pixels; no resize
SIZES = [(48, 64, 56 * 56, 28 * 28 * 1280), (200, 300, 56 * 56, 28 * 28 * 16), (30, 20, 28 * 28 * 20, 28 * 28 * 1280),
         (56, 84, 56 * 56, 28 * 28 * 1280)]


@pytest.mark.parametrize("height,width,min_pixels,max_pixels", SIZES)
@pytest.mark.parametrize("num_frames", [1, 2, 3])
def test_repeated_picture_equals_the_image_processor(height, width, min_pixels, max_pixels, num_frames):
    picture = _picture(height, width, seed=0)
    expected, (grid_h, grid_w) = _hf_image(picture, min_pixels, max_pixels)
    rows, grid = qwen_video_patches(np.stack([picture] * num_frames), min_pixels=min_pixels, max_pixels=max_pixels,
                                    **PATCH)
    grid_t = (num_frames + 1) // 2  # an odd count is padded with the last frame
    assert grid == (grid_t, grid_h, grid_w)
    assert rows.dtype == torch.float32 and rows.shape == (grid_t * grid_h * grid_w, 3 * 2 * 14 * 14)
    np.testing.assert_array_equal(rows.numpy(), np.concatenate([expected] * grid_t))  # bit-exact


def test_temporal_layout(height=200, width=300, min_pixels=56 * 56, max_pixels=28 * 28 * 16):
    """Each row is [channel, time, patch pixels]: time slot k of temporal patch j holds frame 2j+k, and a third frame
    fills both slots of the second temporal patch (padded by repeating it)."""
    pictures = [_picture(height, width, seed) for seed in (1, 2, 3)]
    singles = [_hf_image(p, min_pixels, max_pixels)[0].reshape(-1, 3, 2, 14, 14) for p in pictures]
    rows, (grid_t, grid_h, grid_w) = qwen_video_patches(np.stack(pictures), min_pixels=min_pixels,
                                                        max_pixels=max_pixels, **PATCH)
    assert grid_t == 2
    first, second = rows.numpy().reshape(grid_t, grid_h * grid_w, 3, 2, 14, 14)
    np.testing.assert_array_equal(first[:, :, 0], singles[0][:, :, 0])
    np.testing.assert_array_equal(first[:, :, 1], singles[1][:, :, 0])
    np.testing.assert_array_equal(second[:, :, 0], singles[2][:, :, 0])
    np.testing.assert_array_equal(second[:, :, 1], singles[2][:, :, 0])
    assert not np.array_equal(first[:, :, 0], first[:, :, 1])


def test_impossible_sizes_are_one_line():
    with pytest.raises(UserError, match="aspect ratio above 200"):
        qwen_video_patches(np.zeros((2, 1, 201, 3), np.uint8), min_pixels=56 * 56, max_pixels=28 * 28 * 1280, **PATCH)
    with pytest.raises(UserError, match="less than one 28x28 patch"):
        qwen_video_patches(np.zeros((2, 10, 10, 3), np.uint8), min_pixels=0, max_pixels=28 * 28 * 1280, **PATCH)


@pytest.mark.parametrize("height,width,resized", [(56, 84, False), (200, 300, True)])
def test_equals_the_video_processor(height, width, resized):
    """transformers' own Qwen2-VL video processor (it needs torchvision): equal where no frame is resized (up to the
    float rounding of its fused rescale+normalize); where frames are resized, torchvision's antialiased bicubic
    differs from PIL's by a pixel level or two."""
    pytest.importorskip("torchvision")
    from transformers import Qwen2VLVideoProcessor

    min_pixels, max_pixels = 56 * 56, 28 * 28 * 16
    frames = _frames(n=3, w=width, h=height)
    processor = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    out = processor(videos=[frames], do_sample_frames=False, cap_pixels_per_frame=False, return_tensors="np")
    rows, grid = qwen_video_patches(frames, min_pixels=min_pixels, max_pixels=max_pixels, **PATCH)
    assert [list(grid)] == out["video_grid_thw"].tolist()
    level = 1 / 255 / min(OPENAI_CLIP_STD)  # one uint8 level after normalization
    atol = 2 * level if resized else 1e-5
    np.testing.assert_allclose(rows.numpy(), out["pixel_values_videos"], rtol=0, atol=atol)
