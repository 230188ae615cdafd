"""Videos for the LLaVA families that take them (LLaVA-OneVision, LLaVA-NeXT-Video): each `<video>` placeholder
expanded to its video's positions, the frames processed as the folder's video processor says (resize, centre
crop, rescale, normalise) through transformers' PIL image pipeline, so no torchvision is needed. A prompt's items
(images and videos) travel in prompt order, `item_kinds` saying which is which; every prompt of such a family
carries every key (empty where it has no image or no video), so that prompts concatenate."""
import numpy as np
import torch
from PIL import Image

from vllm_utils.errors import UserError
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.multimodal.video import VideoClip

IMAGE_KEYS = ("pixel_values", "image_sizes", "image_tiles")
VIDEO_KEYS = ("pixel_values_videos", "video_frames")


class LlavaVideoMixin:
    """Mixed into a LLaVA-NeXT adapter: the family's video positions come from `video_positions(frames)`."""

    video_token = "<video>"

    def video_positions(self, frames: int) -> int:
        raise NotImplementedError

    def video_processor_defaults(self) -> dict:
        """The family's video processor's settings where the folder's files say nothing."""
        raise NotImplementedError

    # ---- set-up ------------------------------------------------------------------------------------
    def __init__(self, folder: str, hf_config, allow_missing: bool = False,
                 processor_kwargs: dict | None = None) -> None:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        from vllm_utils.multimodal.processor import json_file

        super().__init__(folder, hf_config, allow_missing, processor_kwargs)
        self.video_token_id = hf_config.video_token_index
        files = json_file(self.folder, "processor_config.json").get("video_processor") or \
            json_file(self.folder, "video_preprocessor_config.json")
        settings = {**self.video_processor_defaults(), **{k: v for k, v in files.items() if k in _FRAME_FIELDS}}
        self.frame_processor = CLIPImageProcessorPil(**settings)

    # ---- items -------------------------------------------------------------------------------------
    def video_inputs(self, video: VideoClip | np.ndarray | list) -> MultiModalInputs:
        """One video's item: its frames (a VideoClip, [T, H, W, 3] uint8, or PIL frames) as the video processor
        makes them."""
        frames = video.frames if isinstance(video, VideoClip) else video
        pictures = [f.convert("RGB") if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f, np.uint8))
                    for f in frames]
        if not pictures:
            raise UserError("a video holds no frames")
        pixels = self.frame_processor(images=pictures, return_tensors="pt")["pixel_values"]
        return {**self._empty(IMAGE_KEYS), "pixel_values_videos": pixels, "video_frames": torch.tensor([len(pixels)]),
                "item_kinds": torch.ones(1, dtype=torch.long)}

    def items(self, processed: MultiModalInputs) -> MultiModalInputs:
        """The images' tensors (as the family makes them), and no video."""
        images = super().items(processed)
        return {**images, **self._empty(VIDEO_KEYS), "item_kinds": torch.zeros(len(images["image_sizes"]),
                                                                                dtype=torch.long)}

    def _empty(self, keys: tuple[str, ...]) -> MultiModalInputs:
        side = self.hf_config.vision_config.image_size
        shapes = {"pixel_values": (0, 3, side, side), "image_sizes": (0, 2), "image_tiles": (0,),
                  "pixel_values_videos": (0, 3, side, side), "video_frames": (0,)}
        return {k: torch.zeros(shapes[k], dtype=torch.float32 if k.startswith("pixel") else torch.long)
                for k in keys}

    def item_positions(self, mm_inputs: MultiModalInputs) -> list[int]:
        images = iter(super().item_positions({k: mm_inputs[k] for k in IMAGE_KEYS}))
        videos = iter(self.video_positions(n) for n in mm_inputs["video_frames"].tolist())
        return [next(videos) if kind else next(images) for kind in mm_inputs["item_kinds"].tolist()]

    def placeholder_ids(self, positions: int, video: bool = False) -> list[int]:
        return [self.video_token_id if video else self.mm_token_id] * positions

    def hf_model_inputs(self, mm_inputs: MultiModalInputs) -> MultiModalInputs:
        """Images as the family's HF model takes them; videos as [videos, frames, 3, H, W] (HF takes a prompt's
        videos of one length)."""
        inputs = {}
        if len(mm_inputs["image_tiles"]):
            inputs.update(super().hf_model_inputs({k: mm_inputs[k] for k in IMAGE_KEYS}))
        frames = mm_inputs["video_frames"].tolist()
        if frames:
            if len(set(frames)) > 1:
                raise UserError(f"HF's model takes the videos of a prompt with one frame count, got {frames}")
            pixels = mm_inputs["pixel_values_videos"]
            inputs["pixel_values_videos"] = pixels.view(len(frames), frames[0], *pixels.shape[1:])
        return inputs

    # ---- prompts -----------------------------------------------------------------------------------
    def process(self, prompt: str, images: list[Image.Image],
                videos: list | None = None) -> tuple[list[int], MultiModalInputs | None]:
        """Token ids with each placeholder repeated for its item's positions, and the items in prompt order (the
        prompt's images processed together, as HF's processor takes them)."""
        if not videos:
            return super().process(prompt, images)
        self._need_tokenizer()
        self.check_placeholders(prompt, images, videos)
        ids = self.tokenizer(prompt)["input_ids"]
        image_part = self.image_inputs(images) if images else None
        image_counts = iter(super().item_positions({k: image_part[k] for k in IMAGE_KEYS}) if images else [])
        video_parts = [self.video_inputs(v) for v in videos]
        kinds, expanded, video_index = [], [], 0
        for token in ids:
            if token == self.mm_token_id:
                kinds.append(0)
                expanded.extend([token] * next(image_counts))
            elif token == self.video_token_id:
                kinds.append(1)
                expanded.extend([token] * self.video_positions(len(video_parts[video_index]["pixel_values_videos"])))
                video_index += 1
            else:
                expanded.append(token)
        images_only = {k: image_part[k] for k in IMAGE_KEYS} if images else self._empty(IMAGE_KEYS)
        return expanded, {**images_only, "item_kinds": torch.tensor(kinds),
                          "pixel_values_videos": torch.cat([v["pixel_values_videos"] for v in video_parts]),
                          "video_frames": torch.cat([v["video_frames"] for v in video_parts])}


# the video processor's fields that the PIL image pipeline takes
_FRAME_FIELDS = ("size", "crop_size", "do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize",
                 "image_mean", "image_std", "resample", "do_convert_rgb")
