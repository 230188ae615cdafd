"""Qwen2-VL's and Qwen2.5-VL's processor adapter. Images and videos keep their own resolution (within the
processor's min/max pixels): an item of (frames / 2) x rows x columns patches takes a quarter as many prompt
positions, each image's `<|image_pad|>` (each video's `<|video_pad|>`) repeated that often, as transformers'
Qwen2VLProcessor expands them. Items travel as one list in prompt order: their patch rows, their grids, whether each
is a video, and a video's seconds per temporal patch (Qwen2.5-VL's time positions). Videos are patched here
(`multimodal/video.py`), so they need no torchvision."""
import json
import os

import numpy as np
import torch
from PIL import Image
from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.multimodal.processor import ProcessorAdapter
from vllm_utils.multimodal.qwen2_vl_video import qwen_video_patches
from vllm_utils.multimodal.video import VideoClip

# transformers' defaults where a folder's processor files say nothing
_IMAGE_PIXELS = (56 * 56, 28 * 28 * 1280)
_VIDEO_PIXELS = (128 * 28 * 28, 28 * 28 * 768)
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
UNTIMED_FPS = 24.0  # transformers' frame rate for frames given without one


class Qwen2VLProcessorAdapter(ProcessorAdapter):
    image_token = "<|image_pad|>"
    video_token = "<|video_pad|>"

    def __init__(self, folder: str, hf_config: PretrainedConfig, allow_missing: bool = False,
                 processor_kwargs: dict | None = None) -> None:
        super().__init__(folder, hf_config, allow_missing, processor_kwargs)
        self.video_token_id = hf_config.video_token_id
        self.vision_start_id = getattr(hf_config, "vision_start_token_id", None)
        self.vision_end_id = getattr(hf_config, "vision_end_token_id", None)
        self.merge = hf_config.vision_config.spatial_merge_size
        self.video_settings = _video_settings(folder)

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of synthetic images: the processor keeps any size, so a square of 16 x 16 positions."""
        side = 16 * self.merge * self.hf_config.vision_config.patch_size
        return side, side

    @staticmethod
    def config_image_token_id(hf_config: PretrainedConfig) -> int:
        return hf_config.image_token_id

    # ---- what the family defines -------------------------------------------------------------------
    def item_positions(self, mm_inputs: MultiModalInputs) -> list[int]:
        return [t * h * w // (self.merge * self.merge) for t, h, w in mm_inputs["grid_thw"].tolist()]

    def fallback_image_processor(self):
        """Qwen2-VL's preprocessing with the hub checkpoints' pixel limits (transformers' PIL processor)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        vision = self.hf_config.vision_config
        return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16384, patch_size=vision.patch_size,
                                        temporal_patch_size=vision.temporal_patch_size,
                                        merge_size=vision.spatial_merge_size)

    def fallback_chat_prompt(self, text: str, num_images: int, num_videos: int = 0) -> str:
        image, video = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
        return f"<|im_start|>user\n{image * num_images}{video * num_videos}{text}<|im_end|>\n<|im_start|>assistant\n"

    def image_inputs(self, images: list[Image.Image]) -> MultiModalInputs:
        """As transformers' processor: a picture smaller than a patch is scaled up to min_pixels; one longer than 200
        times its width (or height) is refused."""
        for image in images:
            width, height = image.size
            if max(width, height) / min(width, height) > 200:
                raise UserError(f"image of {width} x {height} pixels has an aspect ratio above 200, which Qwen2-VL's "
                                f"processor refuses; crop or pad it")
        return super().image_inputs(images)

    def items(self, processed: MultiModalInputs) -> MultiModalInputs:
        grids = processed["image_grid_thw"]
        return {"pixel_values": processed["pixel_values"], "grid_thw": grids,
                "is_video": torch.zeros(len(grids), dtype=torch.bool),
                "second_per_grid_ts": torch.zeros(len(grids))}

    def hf_model_inputs(self, mm_inputs: MultiModalInputs) -> MultiModalInputs:
        """Images and videos apart, as transformers' model takes them."""
        rows = [t * h * w for t, h, w in mm_inputs["grid_thw"].tolist()]
        pieces = mm_inputs["pixel_values"].split(rows)
        out = {}
        for video, (pixels, grid) in ((False, ("pixel_values", "image_grid_thw")),
                                      (True, ("pixel_values_videos", "video_grid_thw"))):
            chosen = [i for i, v in enumerate(mm_inputs["is_video"].tolist()) if v == video]
            if chosen:
                out[pixels] = torch.cat([pieces[i] for i in chosen])
                out[grid] = mm_inputs["grid_thw"][chosen]
                if video and self.hf_config.model_type == "qwen2_5_vl":
                    out["second_per_grid_ts"] = mm_inputs["second_per_grid_ts"][chosen]
        return out

    def hf_token_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Which positions are image (1) and video (2) positions: transformers' model needs them for its RoPE."""
        kinds = (input_ids == self.mm_token_id).int() + 2 * (input_ids == self.video_token_id).int()
        return {"mm_token_type_ids": kinds}

    # ---- prompts with images and videos ------------------------------------------------------------
    def video_inputs(self, video: VideoClip | np.ndarray | list) -> MultiModalInputs:
        """One video's item: a VideoClip (decoded from a file, with its frame rate), or frames ([T, H, W, 3]
        uint8 or a list of PIL images) taken as transformers takes frames given without a rate."""
        if isinstance(video, VideoClip):
            frames, fps = video.frames, video.sampled_fps
        else:
            frames = np.stack([np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f)
                               for f in video])
            fps = UNTIMED_FPS
        s = self.video_settings
        pixels, grid = qwen_video_patches(frames, min_pixels=s["min_pixels"], max_pixels=s["max_pixels"],
                                          patch_size=s["patch_size"], temporal_patch_size=s["temporal_patch_size"],
                                          merge_size=s["merge_size"], mean=s["image_mean"], std=s["image_std"])
        return {"pixel_values": pixels, "grid_thw": torch.tensor([grid]), "is_video": torch.ones(1, dtype=torch.bool),
                "second_per_grid_ts": torch.tensor([s["temporal_patch_size"] / fps])}

    def process(self, prompt: str, images: list[Image.Image],
                videos: list | None = None) -> tuple[list[int], MultiModalInputs | None]:
        """Token ids with each placeholder repeated for its item's positions, and the items in prompt order."""
        self._need_tokenizer()
        videos = videos or []
        self.check_placeholders(prompt, images, videos)
        ids = self.tokenizer(prompt)["input_ids"]
        if not images and not videos:
            return ids, None
        image_items = split_items(self.image_inputs(images)) if images else []
        video_items = [self.video_inputs(v) for v in videos]
        ordered, expanded = [], []
        for token in ids:
            if token in (self.mm_token_id, self.video_token_id):
                item = (image_items if token == self.mm_token_id else video_items).pop(0)
                ordered.append(item)
                token = [token] * self.item_positions(item)[0]
                expanded.extend(token)
            else:
                expanded.append(token)
        return expanded, {key: torch.cat([item[key] for item in ordered]) for key in ordered[0]}

    def placeholder_ids(self, positions: int, video: bool = False) -> list[int]:
        """One item's tokens in a synthetic prompt, framed as the chat template frames it."""
        pad = [self.video_token_id if video else self.mm_token_id] * positions
        if self.vision_start_id is None or self.vision_end_id is None:
            return pad
        return [self.vision_start_id] + pad + [self.vision_end_id]


def split_items(mm_inputs: MultiModalInputs) -> list[MultiModalInputs]:
    """The items of `mm_inputs`, each on its own."""
    rows = [t * h * w for t, h, w in mm_inputs["grid_thw"].tolist()]
    pixels = mm_inputs["pixel_values"].split(rows)
    return [{"pixel_values": pixels[i], **{k: v[i : i + 1] for k, v in mm_inputs.items() if k != "pixel_values"}}
            for i in range(len(rows))]


def _video_settings(folder: str) -> dict:
    """The video processor's settings where transformers looks for them (processor_config.json's video part,
    video_preprocessor_config.json, else the image processor's file), with transformers' defaults."""
    settings = {"min_pixels": _VIDEO_PIXELS[0], "max_pixels": _VIDEO_PIXELS[1], "patch_size": 14,
                "temporal_patch_size": 2, "merge_size": 2, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD}
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
        settings["min_pixels"] = stored.get("min_pixels", size.get("shortest_edge", settings["min_pixels"]))
        settings["max_pixels"] = stored.get("max_pixels", size.get("longest_edge", settings["max_pixels"]))
        settings.update({k: stored[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                                  "image_std") if k in stored})
        break
    return settings
