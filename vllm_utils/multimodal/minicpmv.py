"""MiniCPM-V 4.6's processor adapter. The PIL image processor cuts an image as transformers' MiniCPMV4_6Processor
does (LLaVA-UHD: a thumbnail resized to about scale_resolution^2 pixels, and where the image is larger a grid of up
to max_slice_nums slices of it), each piece packed NaViT-style into patches. Each image placeholder becomes
`<image_id>N</image_id>` (N counting the prompt's images from 0, with use_image_id) + `<image>` + the thumbnail's
positions + `</image>`, then the slices' rows, each slice `<slice>` + its positions + `</slice>`, rows joined by a
newline: expanded here in the prompt's text, as the processor expands it, around the tokenizer and the image
processor (transformers builds MiniCPMV4_6Processor only with torchvision, for its video processor). An item (one
image) carries its patches ([patches, 3, p, p]), its slices' grids in patches and its slice grid.

A video is a sequence of frames, each cut as an image is (MiniCPMV4_6VideoProcessor's geometry is the image
processor's: same thumbnail size, slice grid and slice size; its stack_frames default 1 stacks nothing), here by the
PIL image processor (transformers' video processor resizes with torchvision's bicubic, so pixels may differ by
rounding). Frames given as an array or a list are taken as sampled (transformers cannot sample frames without their
frame rate, and takes them as given with do_sample_frames=False); a VideoClip holding every frame of its file is
sampled as MiniCPMV4_6VideoProcessor.sample_frames samples (a frame a second, at most max_num_frames). Its
placeholder becomes `<image_id>N</image_id>` (N counting the prompt's videos from 0) then, per frame, `<image>` +
the video token per position + `</image>` and its slices' rows (`<slice>`, the video token, `</slice>`), as
MiniCPMV4_6Processor.replace_video_token writes it. A video's item is all its frames' pieces, with `frames` its
frame count (0 for an image).

MiniCPM-V 4.7's processor (MiniCPMV4_7Processor, on 4.6's image and video processors) writes the same, except a
video without `<image_id>N</image_id>`; its model reads which tokens are an image's or a video's positions
(`mm_token_type_ids`) to lay its canvas out, and the config names the markers' ids, checked here against the
tokenizer's."""
import math
import re

import numpy as np
import torch
from PIL import Image
from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.multimodal.glm4v_video import clip_frames
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.multimodal.processor import ProcessorAdapter, json_file
from vllm_utils.multimodal.video import VideoClip

MAX_NUM_FRAMES = 128  # MiniCPMV4_6VideoProcessor's default
DOWNSAMPLE_MODES = {"16x": 16, "4x": 4}  # positions of a slice: its patches divided by this
# the tokenizer's names of the markers, and the hub's tokens where it names none
_MARKERS = {"image_start_token": "<image>", "image_end_token": "</image>", "slice_start_token": "<slice>",
            "slice_end_token": "</slice>", "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>"}


def downsample_divisor(config: PretrainedConfig) -> int:
    """The patches of a slice per prompt position: 16 (the window merger, then the merger) or 4 (the merger)."""
    mode = config.downsample_mode
    if mode not in DOWNSAMPLE_MODES:
        raise UserError(f"downsample_mode '{mode}' is not supported (supported: {', '.join(DOWNSAMPLE_MODES)})")
    return DOWNSAMPLE_MODES[mode]


def sample_frame_indices(total_frames: int, fps: float, max_num_frames: int = MAX_NUM_FRAMES) -> list[int]:
    """The frames MiniCPMV4_6VideoProcessor.sample_frames keeps (stack_frames 1) of a clip of `total_frames` at
    `fps`: frame int(s * fps) for each second s < ceil(duration); a clip longer than max_num_frames seconds is read
    every 0.1 s and thinned to max_num_frames evenly."""
    duration = total_frames / fps
    if duration > max_num_frames:
        indices = [min(int(round(i * 0.1, 1) * fps), total_frames - 1) for i in range(int(duration / 0.1))]
        if len(indices) > max_num_frames:
            indices = [indices[i] for i in np.linspace(0, len(indices) - 1, max_num_frames, dtype=int)]
        return indices
    return [int(i * fps) for i in range(math.ceil(duration))]


class MiniCPMVProcessorAdapter(ProcessorAdapter):
    image_token = "<|image_pad|>"
    video_token = "<|video_pad|>"
    video_image_id = True  # a video's placeholder starts with <image_id>N</image_id> too (with use_image_id)
    # the slicing, and whether an image's index is written before it
    processor_settings = {"max_slice_nums": int, "scale_resolution": int, "slice_mode": bool, "use_image_id": bool}

    def __init__(self, folder: str, hf_config: PretrainedConfig, allow_missing: bool = False,
                 processor_kwargs: dict | None = None) -> None:
        super().__init__(folder, hf_config, allow_missing, processor_kwargs)
        self.markers = {name: getattr(self.tokenizer, name, None) or token for name, token in _MARKERS.items()}
        self.divisor = downsample_divisor(hf_config)
        images = self.image_processor
        if images.downsample_mode != hf_config.downsample_mode:
            raise UserError(f"the image processor's downsample_mode '{images.downsample_mode}' differs from the "
                            f"config's '{hf_config.downsample_mode}'; the folder mixes files of different models")
        if images.patch_size != hf_config.vision_config.patch_size:
            raise UserError(f"the image processor's patch_size {images.patch_size} differs from the vision tower's "
                            f"{hf_config.vision_config.patch_size}; the folder mixes files of different models")
        self.use_image_id = self.processor_kwargs.get("use_image_id", images.use_image_id)
        self.video_token = getattr(self.tokenizer, "video_token", None) or self.video_token
        self.video_token_id = getattr(hf_config, "video_token_id", None)
        # the video processor's settings (its files, else transformers' defaults), the processor's kwargs over them
        stored = {**(json_file(folder, "processor_config.json").get("video_processor") or {}),
                  **json_file(folder, "video_preprocessor_config.json")}
        self.video_settings = {k: stored.get(k, getattr(images, k)) for k in ("max_slice_nums", "scale_resolution",
                                                                               "slice_mode")}
        self.video_settings.update({k: v for k, v in self.processor_kwargs.items() if k != "use_image_id"})
        self.max_num_frames = stored.get("max_num_frames", MAX_NUM_FRAMES)
        for key in ("image_mean", "image_std", "rescale_factor", "patch_size", "downsample_mode"):
            mine = getattr(images, key)
            if key in stored and stored[key] != (list(mine) if isinstance(mine, tuple) else mine):
                raise UserError(f"the video processor's {key} {stored[key]} differs from the image processor's "
                                f"{getattr(images, key)}; frames are cut by the image processor here")
        if stored.get("stack_frames", 1) not in (None, 1):
            raise UserError(f"stack_frames = {stored['stack_frames']} is not supported (only 1: frames of a second "
                            f"stacked into one picture are not implemented)")
        self._layouts: dict[tuple[bool, int], str] = {}  # (video, positions) of an item -> its placeholder text

    @staticmethod
    def config_image_token_id(hf_config: PretrainedConfig) -> int:
        return hf_config.image_token_id

    def fallback_image_processor(self):
        """The PIL processor at transformers' defaults, with the tower's patch size and the config's mode."""
        from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

        return MiniCPMV4_6ImageProcessorPil(patch_size=self.hf_config.vision_config.patch_size,
                                            downsample_mode=self.hf_config.downsample_mode)

    def fallback_chat_prompt(self, text: str, num_images: int, num_videos: int = 0) -> str:
        """ChatML turns, an image placeholder and a newline per image."""
        return f"<|im_start|>user\n{(self.image_token + chr(10)) * num_images}{text}<|im_end|>\n<|im_start|>assistant\n"

    @property
    def image_size(self) -> tuple[int, int]:
        """A square of scale_resolution a side: one thumbnail, no slices."""
        side = self.processor_kwargs.get("scale_resolution", self.image_processor.scale_resolution)
        return side, side

    def placeholder_ids(self, positions: int, video: bool = False) -> list[int]:
        """One image's tokens in a synthetic prompt: its layout where an image of that many positions was
        processed, else the image token repeated."""
        if video and self.video_token_id is None:
            raise UserError("this MiniCPM-V config sets no video_token_id; give the frames as images")
        if self.tokenizer is None or (video, positions) not in self._layouts:
            return [self.video_token_id if video else self.mm_token_id] * positions
        return self.tokenizer(self._layouts[video, positions], add_special_tokens=False)["input_ids"]

    # ---- items -------------------------------------------------------------------------------------
    def image_inputs(self, images: list[Image.Image]) -> MultiModalInputs:
        """Every image's patches (thumbnail first, then its slices row by row), the slices' (height, width) in
        patches, each image's slice count and slice grid (rows, columns; 0, 0 without slices)."""
        settings = {k: v for k, v in self.processor_kwargs.items() if k != "use_image_id"}
        out = self.image_processor(images=images, return_tensors="pt", **settings)
        strip = out["pixel_values"][0]  # [3, p, patches * p]: the patches side by side
        p = strip.shape[1]
        mm_inputs = {"pixel_values": strip.view(strip.shape[0], p, -1, p).permute(2, 0, 1, 3).contiguous(),
                     "target_sizes": torch.as_tensor(out["target_sizes"]).long(),
                     "slices": torch.tensor(out["num_patches_per_image"]).long(),
                     "grids": torch.tensor(out["grids"]).long().view(-1, 2),
                     "frames": torch.zeros(len(images), dtype=torch.long)}
        for item in split_items(mm_inputs):
            self._layouts[False, sum(self._slice_positions(item))] = self._layout(item, 0)
        return mm_inputs

    def video_frames(self, video: VideoClip | np.ndarray | list) -> np.ndarray:
        """uint8 frames [T, H, W, 3] of a video as MiniCPMV4_6VideoProcessor takes them: frames given as taken
        as sampled; a VideoClip of every frame of its file sampled as its sample_frames samples."""
        frames, _ = clip_frames(video)
        if isinstance(video, VideoClip) and len(frames) == video.total_frames:
            frames = frames[sample_frame_indices(video.total_frames, video.fps, self.max_num_frames)]
        if len(frames) == 0:
            raise UserError("a video of no frames; give at least one")
        return frames

    def video_inputs(self, video: VideoClip | np.ndarray | list) -> MultiModalInputs:
        """One video's item: every frame cut as an image (thumbnail, then its slices), frames in order."""
        frames = self.video_frames(video)
        out = self.image_processor(images=[Image.fromarray(f) for f in frames], return_tensors="pt",
                                   **self.video_settings)
        strip = out["pixel_values"][0]
        p = strip.shape[1]
        grids = torch.tensor(out["grids"]).long().view(-1, 2)
        item = {"pixel_values": strip.view(strip.shape[0], p, -1, p).permute(2, 0, 1, 3).contiguous(),
                "target_sizes": torch.as_tensor(out["target_sizes"]).long(),
                "slices": torch.tensor([sum(out["num_patches_per_image"])]).long(), "grids": grids[:1],
                "frames": torch.tensor([len(frames)])}
        self._layouts[True, sum(self._slice_positions(item))] = self._layout(item, 0)
        return item

    def _slice_positions(self, item: MultiModalInputs) -> list[int]:
        return [int(h * w) // self.divisor for h, w in item["target_sizes"].tolist()]

    def item_positions(self, mm_inputs: MultiModalInputs) -> list[int]:
        return [sum(self._slice_positions(item)) for item in split_items(mm_inputs)]

    def hf_model_inputs(self, mm_inputs: MultiModalInputs) -> MultiModalInputs:
        """transformers' model takes one prompt's image patches as one strip [1, 3, p, patches * p] (and its video
        patches as another, `pixel_values_videos`)."""
        out = {}
        items = split_items(mm_inputs)
        for video, (pixels, sizes) in ((False, ("pixel_values", "target_sizes")),
                                       (True, ("pixel_values_videos", "target_sizes_videos"))):
            chosen = [item for item in items if bool(item["frames"][0]) == video]
            if chosen:
                patches = torch.cat([item["pixel_values"] for item in chosen])
                out[pixels] = patches.permute(1, 2, 0, 3).reshape(1, patches.shape[1], patches.shape[2], -1)
                out[sizes] = torch.cat([item["target_sizes"] for item in chosen]).int()
        return out

    # ---- prompts -----------------------------------------------------------------------------------
    def _layout(self, item: MultiModalInputs, index: int) -> str:
        """One image's placeholder text, as MiniCPMV4_6Processor writes it (`index`: its place in the prompt)."""
        m = self.markers
        frames = int(item["frames"][0])
        if frames:  # a video: each frame as replace_video_token writes it, every slice with the first's count
            counts = self._slice_positions(item)
            per_frame = len(counts) // frames
            rows, cols = item["grids"][0].tolist()
            text = ""
            for f in range(frames):
                frame = counts[f * per_frame:(f + 1) * per_frame]
                text += m["image_start_token"] + self.video_token * frame[0] + m["image_end_token"]
                if self.video_settings["slice_mode"] and rows > 0 and cols > 0:
                    one = m["slice_start_token"] + self.video_token * (frame[1] if len(frame) > 1 else 0)
                    text += "\n".join([(one + m["slice_end_token"]) * cols] * rows)
        else:
            token = self.image_token
            counts = self._slice_positions(item)
            text = m["image_start_token"] + token * counts[0] + m["image_end_token"]
            rows, cols = item["grids"][0].tolist()
            if self.processor_kwargs.get("slice_mode", self.image_processor.slice_mode) and rows > 0 and cols > 0:
                slices = [m["slice_start_token"] + token * n + m["slice_end_token"] for n in counts[1:]]
                text += "\n".join("".join(slices[r * cols:(r + 1) * cols]) for r in range(rows))
        if self.use_image_id and (self.video_image_id or not frames):
            text = f"{m['image_id_start_token']}{index}{m['image_id_end_token']}" + text
        return text

    def process(self, prompt: str, images: list[Image.Image],
                videos: list | None = None) -> tuple[list[int], MultiModalInputs | None]:
        """Token ids of the prompt with each image and video placeholder expanded in its text as MiniCPMV4_6Processor
        expands it (images and videos each counted from 0 for their ids), and the items in prompt order."""
        self._need_tokenizer()
        videos = videos or []
        self.check_placeholders(prompt, images, videos)
        if not images and not videos:
            return self.tokenizer(prompt)["input_ids"], None
        pending = {self.image_token: split_items(self.image_inputs(images)) if images else [],
                   self.video_token: [self.video_inputs(v) for v in videos]}
        seen = {self.image_token: 0, self.video_token: 0}
        text, ordered = [], []
        for part in re.split(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})", prompt):
            if part in pending:
                ordered.append(pending[part].pop(0))
                text.append(self._layout(ordered[-1], seen[part]))
                seen[part] += 1
            else:
                text.append(part)
        mm_inputs = {key: torch.cat([item[key] for item in ordered]) for key in ordered[0]}
        ids = self.tokenizer("".join(text))["input_ids"]
        marked = {self.mm_token_id, self.video_token_id}
        expanded, expected = sum(t in marked for t in ids), sum(self.item_positions(mm_inputs))
        if expanded != expected:
            raise UserError(f"the processor expands the images to {expanded} positions but the vision tower yields "
                            f"{expected} features; the processor's settings do not match the model's")
        return ids, mm_inputs


class MiniCPMV4_7ProcessorAdapter(MiniCPMVProcessorAdapter):
    video_image_id = False
    # the config's id of each marker, by the tokenizer's name of it (the newline: "\n", one token)
    _CONFIG_IDS = {"image_start_token": "image_start_id", "image_end_token": "image_end_id",
                   "slice_start_token": "slice_start_id", "slice_end_token": "slice_end_id"}

    def __init__(self, folder: str, hf_config: PretrainedConfig, allow_missing: bool = False,
                 processor_kwargs: dict | None = None) -> None:
        super().__init__(folder, hf_config, allow_missing, processor_kwargs)
        if self.tokenizer is None:
            return
        found = {field: self.tokenizer.convert_tokens_to_ids(self.markers[name])
                 for name, field in self._CONFIG_IDS.items()}
        newline = self.tokenizer("\n", add_special_tokens=False)["input_ids"]
        found["newline_id"] = newline[0] if len(newline) == 1 else newline
        for field, token_id in found.items():
            if getattr(hf_config, field, None) != token_id:
                raise UserError(f"the tokenizer's id for the marker of the config's {field} is {token_id}, not "
                                f"{getattr(hf_config, field, None)}; the folder mixes files of different models")

    def hf_token_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Which tokens are an image's (1) or a video's (2) positions, as MiniCPMV4_7Processor marks them."""
        video = (input_ids == self.video_token_id) if self.video_token_id is not None else torch.zeros_like(input_ids)
        return {"mm_token_type_ids": (input_ids == self.mm_token_id).int() + 2 * video.int()}


def split_items(mm_inputs: MultiModalInputs) -> list[MultiModalInputs]:
    """The items of a batch of images and videos, one by one (each its patches, slices, grid and frames)."""
    slices = mm_inputs["slices"].tolist()
    sizes = mm_inputs["target_sizes"].split(slices)
    patches = mm_inputs["pixel_values"].split([int(s.prod(-1).sum()) for s in sizes])
    return [{"pixel_values": p, "target_sizes": s, "slices": mm_inputs["slices"][i:i + 1],
             "grids": mm_inputs["grids"][i:i + 1], "frames": mm_inputs["frames"][i:i + 1]} for i, (p, s) in enumerate(zip(patches, sizes))]
