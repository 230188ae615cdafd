"""GLM-4.1V's processor adapter. Images keep their own resolution (sides multiples of 28, twice their pixels
within the processor's limits: GLM counts an image's two temporal copies): an image of rows x columns patches takes
a quarter as many prompt positions, its `<|image|>` repeated that often between `<|begin_of_image|>` and
`<|end_of_image|>`, as transformers' Glm4vProcessor expands it. A video's `<|video|>` becomes one such image per
temporal patch, each followed by the second it starts at (`glm4v_video.py`). transformers builds that processor
only with torchvision (for its video processor), so the placeholders are expanded here, in the prompt's text as
Glm4vProcessor does, around the tokenizer and the PIL image processor. Items travel as one list in prompt order:
their patch rows, their grids, and whether each is a video."""
import re

import numpy as np
import torch
from PIL import Image
from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.multimodal.glm4v_video import clip_frames, glm_video_patches, video_settings, video_text
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.multimodal.processor import ProcessorAdapter
from vllm_utils.multimodal.qwen2_vl import split_items
from vllm_utils.multimodal.video import VideoClip

# transformers' Glm4vImageProcessor defaults, for folders without processor files
_SHORTEST_EDGE, _LONGEST_EDGE = 112 * 112, 28 * 28 * 15000


class Glm4vProcessorAdapter(ProcessorAdapter):
    image_token = "<|image|>"
    video_token = "<|video|>"

    def __init__(self, folder: str, hf_config: PretrainedConfig, allow_missing: bool = False,
                 processor_kwargs: dict | None = None) -> None:
        super().__init__(folder, hf_config, allow_missing, processor_kwargs)
        self.merge = hf_config.vision_config.spatial_merge_size
        self.image_start_id = hf_config.image_start_token_id
        self.image_end_id = hf_config.image_end_token_id
        self.video_start_id = hf_config.video_start_token_id
        self.video_end_id = hf_config.video_end_token_id
        self.video_token_id = hf_config.video_token_id
        self.video_settings = video_settings(folder)

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of synthetic images: the processor keeps any size, so a square of 16 x 16 positions."""
        side = 16 * self.merge * self.hf_config.vision_config.patch_size
        return side, side

    @staticmethod
    def config_image_token_id(hf_config: PretrainedConfig) -> int:
        return hf_config.image_token_id

    def item_positions(self, mm_inputs: MultiModalInputs) -> list[int]:
        return [t * h * w // (self.merge * self.merge) for t, h, w in mm_inputs["grid_thw"].tolist()]

    def fallback_image_processor(self):
        """GLM-4.1V's preprocessing with transformers' default pixel limits (its PIL processor)."""
        from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

        vision = self.hf_config.vision_config
        return Glm4vImageProcessorPil(size={"shortest_edge": _SHORTEST_EDGE, "longest_edge": _LONGEST_EDGE},
                                      patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                                      merge_size=vision.spatial_merge_size)

    def fallback_chat_prompt(self, text: str, num_images: int, num_videos: int = 0) -> str:
        image, video = "<|begin_of_image|><|image|><|end_of_image|>", "<|begin_of_video|><|video|><|end_of_video|>"
        return f"[gMASK]<sop><|user|>\n{image * num_images}{video * num_videos}{text}<|assistant|>\n"

    def image_inputs(self, images: list[Image.Image]) -> MultiModalInputs:
        """As transformers' processor: a picture smaller than 28 pixels a side is scaled up; one longer than 200
        times its width (or height) is refused."""
        for image in images:
            width, height = image.size
            if max(width, height) / min(width, height) > 200:
                raise UserError(f"image of {width} x {height} pixels has an aspect ratio above 200, which "
                                f"GLM-4.1V's processor refuses; crop or pad it")
        return super().image_inputs(images)

    def items(self, processed: MultiModalInputs) -> MultiModalInputs:
        grids = processed["image_grid_thw"]
        return {"pixel_values": processed["pixel_values"], "grid_thw": grids,
                "is_video": torch.zeros(len(grids), dtype=torch.bool)}

    def video_inputs(self, video: VideoClip | np.ndarray | list) -> MultiModalInputs:
        """One video's item: a VideoClip (decoded from a file, with its frame rate), or frames ([T, H, W, 3] uint8
        or a list of PIL images) taken as transformers takes frames given without a rate."""
        return self._video_item(clip_frames(video)[0])

    def _video_item(self, frames: np.ndarray) -> MultiModalInputs:
        pixels, grid = glm_video_patches(frames, self.video_settings)
        return {"pixel_values": pixels, "grid_thw": torch.tensor([grid]), "is_video": torch.ones(1, dtype=torch.bool)}

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
        return out

    def process(self, prompt: str, images: list[Image.Image],
                videos: list | None = None) -> tuple[list[int], MultiModalInputs | None]:
        """Token ids of the prompt with each placeholder expanded in its text as Glm4vProcessor expands it, and the
        items in prompt order."""
        self._need_tokenizer()
        videos = videos or []
        self.check_placeholders(prompt, images, videos)
        if not images and not videos:
            return self.tokenizer(prompt)["input_ids"], None
        image_items = split_items(self.image_inputs(images)) if images else []
        pending_videos = list(videos)
        text, ordered = [], []
        for part in re.split(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})", prompt):
            if part == self.image_token:
                item = image_items.pop(0)
                text.append(part * self.item_positions(item)[0])
            elif part == self.video_token:
                frames, times = clip_frames(pending_videos.pop(0))
                item = self._video_item(frames)
                text.append(video_text(times, tuple(item["grid_thw"][0].tolist()), self.merge, self.image_token))
            else:
                text.append(part)
                continue
            ordered.append(item)
        ids = self.tokenizer("".join(text))["input_ids"]
        return ids, {key: torch.cat([item[key] for item in ordered]) for key in ordered[0]}

    def hf_token_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Which positions are image (1) and video (2) positions, as Glm4vProcessor marks them (a video's frames use
        the image token, between its begin and end tokens): transformers' model needs them for its RoPE."""
        inside_video = (input_ids == self.video_start_id).cumsum(-1) > (input_ids == self.video_end_id).cumsum(-1)
        image = input_ids == self.mm_token_id
        return {"mm_token_type_ids": (image & ~inside_video).int() + 2 * (image & inside_video).int()}

    def placeholder_ids(self, positions: int, video: bool = False) -> list[int]:
        """One item's tokens in a synthetic prompt, framed as the chat template frames it (a video's frames
        back to back, without their times: the positions count alone tells no frames apart)."""
        start, end = (self.video_start_id, self.video_end_id) if video else (self.image_start_id, self.image_end_id)
        return [start] + [self.mm_token_id] * positions + [end]
