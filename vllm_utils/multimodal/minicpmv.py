"""MiniCPM-V 4.6's processor adapter. The PIL image processor cuts an image as transformers' MiniCPMV4_6Processor
does (LLaVA-UHD: a thumbnail resized to about scale_resolution^2 pixels, and where the image is larger a grid of up
to max_slice_nums slices of it), each piece packed NaViT-style into patches. Each image placeholder becomes
`<image_id>N</image_id>` (N counting the prompt's images from 0, with use_image_id) + `<image>` + the thumbnail's
positions + `</image>`, then the slices' rows, each slice `<slice>` + its positions + `</slice>`, rows joined by a
newline: expanded here in the prompt's text, as the processor expands it, around the tokenizer and the image
processor (transformers builds MiniCPMV4_6Processor only with torchvision, for its video processor). An item (one
image) carries its patches ([patches, 3, p, p]), its slices' grids in patches and its slice grid. Videos are
refused: transformers' MiniCPMV4_6VideoProcessor resizes, stacks and slices frames with torchvision."""
import re

import torch
from PIL import Image
from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.multimodal.processor import ProcessorAdapter

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


class MiniCPMVProcessorAdapter(ProcessorAdapter):
    image_token = "<|image_pad|>"
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
        self._layouts: dict[int, str] = {}  # positions of an item -> its placeholder text (synthetic prompts)

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
        if video:
            raise UserError("MiniCPM-V videos are not supported: transformers' MiniCPMV4_6VideoProcessor samples, "
                            "stacks and slices frames with torchvision, which this engine does not reproduce; give "
                            "the frames as images")
        if self.tokenizer is None or positions not in self._layouts:
            return [self.mm_token_id] * positions
        return self.tokenizer(self._layouts[positions], add_special_tokens=False)["input_ids"]

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
                     "grids": torch.tensor(out["grids"]).long().view(-1, 2)}
        for item in split_items(mm_inputs):
            self._layouts[sum(self._slice_positions(item))] = self._layout(item, 0)
        return mm_inputs

    def _slice_positions(self, item: MultiModalInputs) -> list[int]:
        return [int(h * w) // self.divisor for h, w in item["target_sizes"].tolist()]

    def item_positions(self, mm_inputs: MultiModalInputs) -> list[int]:
        return [sum(self._slice_positions(item)) for item in split_items(mm_inputs)]

    def hf_model_inputs(self, mm_inputs: MultiModalInputs) -> MultiModalInputs:
        """transformers' model takes one prompt's patches as one strip [1, 3, p, patches * p]."""
        patches = mm_inputs["pixel_values"]
        strip = patches.permute(1, 2, 0, 3).reshape(1, patches.shape[1], patches.shape[2], -1)
        return {"pixel_values": strip, "target_sizes": mm_inputs["target_sizes"].int()}

    # ---- prompts -----------------------------------------------------------------------------------
    def _layout(self, item: MultiModalInputs, index: int) -> str:
        """One image's placeholder text, as MiniCPMV4_6Processor writes it (`index`: its place in the prompt)."""
        m, token = self.markers, self.image_token
        counts = self._slice_positions(item)
        text = m["image_start_token"] + token * counts[0] + m["image_end_token"]
        rows, cols = item["grids"][0].tolist()
        if self.processor_kwargs.get("slice_mode", self.image_processor.slice_mode) and rows > 0 and cols > 0:
            slices = [m["slice_start_token"] + token * n + m["slice_end_token"] for n in counts[1:]]
            text += "\n".join("".join(slices[r * cols:(r + 1) * cols]) for r in range(rows))
        if self.use_image_id:
            text = f"{m['image_id_start_token']}{index}{m['image_id_end_token']}" + text
        return text

    def process(self, prompt: str, images: list[Image.Image],
                videos: list | None = None) -> tuple[list[int], MultiModalInputs | None]:
        """Token ids of the prompt with each image placeholder expanded in its text as MiniCPMV4_6Processor expands
        it, and the images' items in prompt order."""
        self._need_tokenizer()
        self.check_placeholders(prompt, images, videos or [])
        if not images:
            return self.tokenizer(prompt)["input_ids"], None
        mm_inputs = self.image_inputs(images)
        layouts = iter([self._layout(item, i) for i, item in enumerate(split_items(mm_inputs))])
        ids = self.tokenizer(re.sub(re.escape(self.image_token), lambda _: next(layouts), prompt))["input_ids"]
        expanded, expected = ids.count(self.mm_token_id), sum(self.item_positions(mm_inputs))
        if expanded != expected:
            raise UserError(f"the processor expands the images to {expanded} positions but the vision tower yields "
                            f"{expected} features; the processor's settings do not match the model's")
        return ids, mm_inputs


def split_items(mm_inputs: MultiModalInputs) -> list[MultiModalInputs]:
    """The items of a batch of images, one by one (each its patches, slices and grid)."""
    slices = mm_inputs["slices"].tolist()
    sizes = mm_inputs["target_sizes"].split(slices)
    patches = mm_inputs["pixel_values"].split([int(s.prod(-1).sum()) for s in sizes])
    return [{"pixel_values": p, "target_sizes": s, "slices": mm_inputs["slices"][i:i + 1],
             "grids": mm_inputs["grids"][i:i + 1]} for i, (p, s) in enumerate(zip(patches, sizes))]
