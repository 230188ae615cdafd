"""Qwen3-VL's processor adapter. Images keep their own resolution (sides multiples of 32 = patch 16 x merge 2, the
pixels within the image processor's limits, as transformers' Qwen2-VL image processor sizes them with Qwen3-VL's
files): an image of rows x columns patches takes a quarter as many prompt positions, its `<|image_pad|>` repeated that
often. A video's `<|vision_start|><|video_pad|><|vision_end|>` becomes, per temporal patch, its time as text and its
positions between the vision markers (`qwen3_vl_video.py`), as Qwen3VLProcessor writes it. transformers builds that
processor only with torchvision (for its video processor), so the placeholders are expanded here in the prompt's
text, around the tokenizer and the PIL image processor. Items travel as Qwen2-VL's do, one list in prompt order."""
import re

import numpy as np
import torch
from transformers import PretrainedConfig

from vllm_utils.multimodal.glm4v_video import clip_frames
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.multimodal.qwen2_vl import Qwen2VLProcessorAdapter, split_items
from vllm_utils.multimodal.qwen3_vl_video import qwen3_video_patches, video_settings, video_text
from vllm_utils.multimodal.video import VideoClip

# transformers' Qwen3-VL image processor settings where a folder has no processor files (the hub's)
_IMAGE_PIXELS = (65536, 16777216)


class Qwen3VLProcessorAdapter(Qwen2VLProcessorAdapter):
    def __init__(self, folder: str, hf_config: PretrainedConfig, allow_missing: bool = False,
                 processor_kwargs: dict | None = None) -> None:
        super().__init__(folder, hf_config, allow_missing, processor_kwargs)
        self.video_settings = video_settings(folder)
        self.video_wrapper = "<|vision_start|>" + self.video_token + "<|vision_end|>"

    def fallback_image_processor(self):
        """Qwen3-VL's preprocessing with the hub checkpoints' pixel limits (transformers' PIL processor)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        vision = self.hf_config.vision_config
        return Qwen2VLImageProcessorPil(size={"shortest_edge": _IMAGE_PIXELS[0], "longest_edge": _IMAGE_PIXELS[1]},
                                        patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                                        merge_size=vision.spatial_merge_size, image_mean=[0.5] * 3,
                                        image_std=[0.5] * 3)

    def fallback_chat_prompt(self, text: str, num_images: int, num_videos: int = 0) -> str:
        image, video = "<|vision_start|><|image_pad|><|vision_end|>", self.video_wrapper
        return f"<|im_start|>user\n{image * num_images}{video * num_videos}{text}<|im_end|>\n<|im_start|>assistant\n"

    def items(self, processed: MultiModalInputs) -> MultiModalInputs:
        grids = processed["image_grid_thw"]
        return {"pixel_values": processed["pixel_values"], "grid_thw": grids,
                "is_video": torch.zeros(len(grids), dtype=torch.bool)}

    def video_inputs(self, video: VideoClip | np.ndarray | list) -> MultiModalInputs:
        """One video's item: a VideoClip (decoded from a file, with its frame rate), or frames ([T, H, W, 3] uint8
        or a list of PIL images) taken as transformers takes frames given without a rate."""
        return self._video_item(clip_frames(video)[0])

    def _video_item(self, frames: np.ndarray) -> MultiModalInputs:
        pixels, grid = qwen3_video_patches(frames, self.video_settings)
        return {"pixel_values": pixels, "grid_thw": torch.tensor([grid]), "is_video": torch.ones(1, dtype=torch.bool)}

    def process(self, prompt: str, images: list,
                videos: list | None = None) -> tuple[list[int], MultiModalInputs | None]:
        """Token ids of the prompt with each placeholder expanded in its text as Qwen3VLProcessor expands it, and
        the items in prompt order."""
        self._need_tokenizer()
        videos = videos or []
        self.check_placeholders(prompt, images, videos)
        if not images and not videos:
            return self.tokenizer(prompt)["input_ids"], None
        if videos:  # the chat template's markers around a video: each of its pictures writes its own
            prompt = prompt.replace(self.video_wrapper, self.video_token)
        image_items = split_items(self.image_inputs(images)) if images else []
        pending = list(videos)
        text, ordered = [], []
        for part in re.split(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})", prompt):
            if part == self.image_token:
                item = image_items.pop(0)
                text.append(part * self.item_positions(item)[0])
            elif part == self.video_token:
                frames, times = clip_frames(pending.pop(0))
                item = self._video_item(frames)
                text.append(video_text(times, tuple(item["grid_thw"][0].tolist()), self.merge,
                                       self.video_settings["temporal_patch_size"], self.video_token))
            else:
                text.append(part)
                continue
            ordered.append(item)
        ids = self.tokenizer("".join(text))["input_ids"]
        return ids, {key: torch.cat([item[key] for item in ordered]) for key in ordered[0]}
