"""InternVL's processor adapter. An image is cut into tiles as transformers' InternVLProcessor cuts it (GOT-OCR2's
`crop_to_patches`: the grid of min_patches..max_patches tiles whose shape is nearest the picture's, plus a
thumbnail of the whole where there are several), and its `<IMG_CONTEXT>` becomes `<img>` + the tiles' positions
+ `</img>`; a video's `<video>` becomes one such image per frame, each frame one tile, written
`Frame1: <img>...</img>` and joined by newlines. transformers builds InternVLProcessor only with torchvision (for
its video processor), so the placeholders are expanded here, in the prompt's text as the processor does, around
the tokenizer and the PIL image processor; video frames are resized with PIL's bicubic (transformers' video
processor uses torchvision's). An item (image or video) carries its tiles' pixels and its tile count."""
import re

import numpy as np
import torch
from PIL import Image
from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.multimodal.processor import ProcessorAdapter, json_file
from vllm_utils.multimodal.video import VideoClip

START, END = "<img>", "</img>"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # the hub's preprocessor_config
_FRAME_FIELDS = ("size", "image_mean", "image_std", "resample", "rescale_factor", "do_convert_rgb")


def pair(value: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    """(height, width) of a config value given as one integer or a pair."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def patch_grid(vision: PretrainedConfig) -> int:
    """Patches a side of one tile (the tower's grid is square: `internvl_vision.check_vision_config`)."""
    return pair(vision.image_size)[0] // pair(vision.patch_size)[0]


def shuffle_factor(config: PretrainedConfig) -> int:
    """1 / downsample_ratio: the side of the block of patches the pixel shuffle makes one position."""
    ratio = config.downsample_ratio
    factor = round(1 / ratio) if ratio > 0 else 0
    grid = patch_grid(config.vision_config)
    if factor < 1 or abs(factor * ratio - 1) > 1e-9 or grid % factor:
        raise UserError(f"downsample_ratio = {ratio} is not supported: 1 / downsample_ratio must be a whole number "
                        f"that divides the tile's {grid} patches a side")
    return factor


def tile_positions(config: PretrainedConfig) -> int:
    """Prompt positions of one tile: its patch grid in blocks of factor x factor patches."""
    return (patch_grid(config.vision_config) // shuffle_factor(config)) ** 2


class InternVLProcessorAdapter(ProcessorAdapter):
    image_token = "<IMG_CONTEXT>"
    video_token = "<video>"
    processor_settings = {"crop_to_patches": bool, "min_patches": int, "max_patches": int}  # the tiling

    def __init__(self, folder: str, hf_config: PretrainedConfig, allow_missing: bool = False,
                 processor_kwargs: dict | None = None) -> None:
        super().__init__(folder, hf_config, allow_missing, processor_kwargs)
        self.video_token = getattr(self.tokenizer, "video_token", None) or self.video_token
        stored = json_file(folder, "processor_config.json")
        self.image_seq_length = stored.get("image_seq_length", getattr(hf_config, "image_seq_length", 256))
        if self.image_seq_length != tile_positions(hf_config):
            raise UserError(f"the processor gives each tile {self.image_seq_length} positions (image_seq_length) but "
                            f"the vision tower yields {tile_positions(hf_config)}; the folder mixes files of different "
                            f"models")
        self.frame_processor = self._frame_processor(folder)

    @staticmethod
    def config_image_token_id(hf_config: PretrainedConfig) -> int:
        return hf_config.image_token_id

    def item_positions(self, mm_inputs: MultiModalInputs) -> list[int]:
        return [tiles * self.image_seq_length for tiles in mm_inputs["tiles"].tolist()]

    def fallback_image_processor(self):
        """GOT-OCR2's PIL processor at the tower's tile size with the hub's ImageNet mean and std."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        height, width = pair(self.hf_config.vision_config.image_size)
        return GotOcr2ImageProcessorPil(size={"height": height, "width": width}, image_mean=IMAGENET_MEAN,
                                        image_std=IMAGENET_STD)

    def _frame_processor(self, folder: str):
        """Frames as transformers' InternVLVideoProcessor prepares them (resize to its size, rescale, normalise),
        through the PIL image processor: the video processor's settings where the folder stores them, else the
        image processor's."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        images = self.image_processor
        settings = {"size": dict(images.size), "image_mean": list(images.image_mean),
                    "image_std": list(images.image_std), "resample": images.resample}
        files = json_file(folder, "processor_config.json").get("video_processor") or \
            json_file(folder, "video_preprocessor_config.json")
        settings.update({k: v for k, v in files.items() if k in _FRAME_FIELDS})
        return GotOcr2ImageProcessorPil(**settings)

    def fallback_chat_prompt(self, text: str, num_images: int, num_videos: int = 0) -> str:
        """The hub's chat template: ChatML turns, `<IMG_CONTEXT>` and a newline per image, `<video>` per video."""
        parts = f"{self.image_token}\n" * num_images + f"{self.video_token}\n" * num_videos
        return f"<|im_start|>user\n{parts}{text}<|im_end|>\n<|im_start|>assistant\n"

    # ---- items -------------------------------------------------------------------------------------
    def image_inputs(self, images: list[Image.Image]) -> MultiModalInputs:
        """Each image's tiles (its thumbnail last) and tile count, as InternVLProcessor tiles them."""
        settings = {"crop_to_patches": True, **self.processor_kwargs}
        out = self.image_processor(images=images, return_tensors="pt", **settings)
        return {"pixel_values": out["pixel_values"], "tiles": torch.as_tensor(out["num_patches"]).long().view(-1)}

    def video_inputs(self, video: VideoClip | np.ndarray | list) -> MultiModalInputs:
        """One video's item: its frames (a VideoClip, [T, H, W, 3] uint8, or PIL frames), each one tile."""
        frames = video.frames if isinstance(video, VideoClip) else video
        pictures = [f.convert("RGB") if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f, np.uint8))
                    for f in frames]
        if not pictures:
            raise UserError("a video holds no frames")
        pixels = self.frame_processor(images=pictures, crop_to_patches=False, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "tiles": torch.tensor([len(pictures)])}

    def hf_model_inputs(self, mm_inputs: MultiModalInputs) -> MultiModalInputs:
        """transformers' model takes every tile and frame as one `pixel_values`, in prompt order."""
        return {"pixel_values": mm_inputs["pixel_values"]}

    # ---- prompts -----------------------------------------------------------------------------------
    def _tile_text(self, tiles: int) -> str:
        return START + self.image_token * (self.image_seq_length * tiles) + END

    def _video_text(self, frames: int) -> str:
        return "\n".join(f"Frame{i + 1}: {self._tile_text(1)}" for i in range(frames))

    def process(self, prompt: str, images: list[Image.Image],
                videos: list | None = None) -> tuple[list[int], MultiModalInputs | None]:
        """Token ids of the prompt with each placeholder expanded in its text as InternVLProcessor expands it, and
        the items in prompt order."""
        self._need_tokenizer()
        videos = videos or []
        self.check_placeholders(prompt, images, videos)
        if not images and not videos:
            return self.tokenizer(prompt)["input_ids"], None
        image_items = iter(split_items(self.image_inputs(images)) if images else [])
        video_items = iter([self.video_inputs(v) for v in videos])
        text, ordered = [], []
        pattern = f"({re.escape(self.image_token)}|{re.escape(self.video_token)})"
        for part in re.split(pattern, prompt):
            if part == self.image_token:
                ordered.append(next(image_items))
                text.append(self._tile_text(int(ordered[-1]["tiles"][0])))
            elif part == self.video_token:
                ordered.append(next(video_items))
                text.append(self._video_text(int(ordered[-1]["tiles"][0])))
            else:
                text.append(part)
        return self.tokenizer("".join(text))["input_ids"], {key: torch.cat([item[key] for item in ordered])
                                                             for key in ordered[0]}

    def placeholder_ids(self, positions: int, video: bool = False) -> list[int]:
        """One item's tokens in a synthetic prompt, framed as the processor frames it (a video's frames with
        their `FrameN:` labels)."""
        if self.tokenizer is None:
            return [self.mm_token_id] * positions
        tiles = positions // self.image_seq_length
        text = self._video_text(tiles) if video else self._tile_text(tiles)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def split_items(mm_inputs: MultiModalInputs) -> list[MultiModalInputs]:
    """The items of a batch of images, one by one (each its tiles' rows)."""
    counts = mm_inputs["tiles"].tolist()
    pixels = mm_inputs["pixel_values"].split(counts)
    return [{"pixel_values": p, "tiles": mm_inputs["tiles"][i:i + 1]} for i, p in enumerate(pixels)]
