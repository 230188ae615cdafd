"""LLaVA-NeXT's and LLaVA-OneVision's processor adapters: an image takes a base view plus the tiles of its best
resolution (OneVision: only the base view when a prompt holds several images), and as many prompt positions as
its feature grid, cropped to its aspect ratio, has cells and rows (each row ends in a newline position)."""
import math
import re

import torch

from vllm_utils.multimodal.anyres import anyres_max_size, tile_grid, unpadded_size
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.multimodal.llava import LlavaProcessorAdapter
from vllm_utils.multimodal.llava_video import LlavaVideoMixin


class LlavaNextProcessorAdapter(LlavaProcessorAdapter):
    def fallback_image_processor(self):
        """LLaVA-NeXT's preprocessing at the tower's tile size and the config's grid resolutions."""
        from transformers import LlavaNextImageProcessor

        size = self.hf_config.vision_config.image_size
        return LlavaNextImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                       image_grid_pinpoints=self.hf_config.image_grid_pinpoints)

    def tiles(self, image_size: tuple[int, int], images_in_prompt: int) -> int:
        """Views of one image through the tower: the base view and its best resolution's tiles."""
        rows, cols = tile_grid(image_size, self.hf_config.image_grid_pinpoints, self.hf_config.vision_config.image_size)
        return rows * cols + 1

    def items(self, processed: MultiModalInputs) -> MultiModalInputs:
        """pixel_values [images, padded views, 3, H, W] -> [views of every image, 3, H, W], with image_tiles."""
        sizes = processed["image_sizes"]
        tiles = [self.tiles(tuple(size), len(sizes)) for size in sizes.tolist()]
        pixels = processed["pixel_values"]
        views = torch.cat([pixels[i, :n] for i, n in enumerate(tiles)]) if pixels.dim() == 5 else pixels
        return {"pixel_values": views, "image_sizes": sizes, "image_tiles": torch.tensor(tiles)}

    def hf_model_inputs(self, mm_inputs: MultiModalInputs) -> MultiModalInputs:
        """HF's model takes the views flattened too, and counts them from the image sizes itself."""
        return {"pixel_values": mm_inputs["pixel_values"], "image_sizes": mm_inputs["image_sizes"]}

    def item_positions(self, mm_inputs: MultiModalInputs) -> list[int]:
        vision = self.hf_config.vision_config
        side = vision.image_size // vision.patch_size
        base = side * side + (vision.model_type == "clip_vision_model")  # CLIP's class token
        base -= self.hf_config.vision_feature_select_strategy == "default"
        positions = []
        for size, tiles in zip(mm_inputs["image_sizes"].tolist(), mm_inputs["image_tiles"].tolist()):
            if tiles == 1:
                positions.append(base + 1)  # and one newline
                continue
            rows, cols = tile_grid(tuple(size), self.hf_config.image_grid_pinpoints, vision.image_size)
            height, width = self.shrunk(*unpadded_size(rows * side, cols * side, tuple(size)), side)
            positions.append(base + height * (width + 1))
        return positions

    def shrunk(self, height: int, width: int, side: int) -> tuple[int, int]:
        return height, width


class LlavaOnevisionProcessorAdapter(LlavaVideoMixin, LlavaNextProcessorAdapter):
    def video_positions(self, frames: int) -> int:
        """Each frame's grid pooled to half its side (rounded up), and one newline for the video."""
        vision = self.hf_config.vision_config
        return frames * math.ceil(vision.image_size // vision.patch_size / 2) ** 2 + 1

    def video_processor_defaults(self) -> dict:
        """transformers' LlavaOnevisionVideoProcessor: the frame resized to the tower's square, no crop."""
        side = self.hf_config.vision_config.image_size
        return {"size": {"height": side, "width": side}, "do_center_crop": False, "resample": 3}

    def prompt_images(self, images: list) -> list:
        """Nested, one list for the prompt: HF's multi-image mode, where each of several images is padded to a
        square (the image mean around it) and resized to one base view, with no tiles."""
        return [images]

    def hf_model_inputs(self, mm_inputs: MultiModalInputs) -> MultiModalInputs:
        """With the prompt's image count: HF's model gives several images of one prompt their base view only."""
        inputs = super().hf_model_inputs(mm_inputs)
        if "image_sizes" in inputs:
            inputs["batch_num_images"] = torch.tensor([len(inputs["image_sizes"])])
        return inputs

    def fallback_image_processor(self):
        from transformers import LlavaOnevisionImageProcessor

        size = self.hf_config.vision_config.image_size
        return LlavaOnevisionImageProcessor(size={"height": size, "width": size},
                                            image_grid_pinpoints=self.hf_config.image_grid_pinpoints)

    def tiles(self, image_size: tuple[int, int], images_in_prompt: int) -> int:
        return super().tiles(image_size, 1) if images_in_prompt == 1 else 1

    def shrunk(self, height: int, width: int, side: int) -> tuple[int, int]:
        max_tiles = int(re.match(r"^anyres_max_(\d+)$", self.hf_config.vision_aspect_ratio).group(1))
        return anyres_max_size(height, width, max_tiles, side) or (height, width)


class LlavaNextVideoProcessorAdapter(LlavaVideoMixin, LlavaNextProcessorAdapter):
    def video_positions(self, frames: int) -> int:
        """Each frame's grid pooled by spatial_pool_stride; no newline."""
        vision = self.hf_config.vision_config
        return frames * (vision.image_size // vision.patch_size // self.hf_config.spatial_pool_stride) ** 2

    def video_processor_defaults(self) -> dict:
        """transformers' LlavaNextVideoVideoProcessor, at the tower's size: shortest edge, then a centre crop."""
        side = self.hf_config.vision_config.image_size
        return {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side},
                "do_center_crop": True, "resample": 3}
