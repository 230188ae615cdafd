"""GOT-OCR2's processor adapter: each page is resized to the encoder's square, or with `crop_to_patches` cut into
tiles of it plus a thumbnail (each tile the positions of one page); the prompt is GOT's own conversation (the hub
folder carries no chat template: its processor writes it), the user's text as the OCR query after the pages. With
`multi_page` the images of a prompt are the pages of one document behind one `<imgpad>`, as GOT's processor takes
them."""
import torch
from PIL import Image
from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.multimodal.processor import ProcessorAdapter

SYSTEM_PROMPT = "You should follow the instructions carefully and explain your answers in detail."
_TILING = {"crop_to_patches": False, "min_patches": 1, "max_patches": 12}  # GotOcr2Processor's defaults


def page_positions(vision: PretrainedConfig) -> int:
    """Prompt positions of one page: the encoder's patch grid, halved twice by the projector's convolutions."""
    side = vision.image_size // vision.patch_size
    for _ in range(2):
        side = (side + 1) // 2  # kernel 3, stride 2, padding 1
    return side * side


class GotOcr2ProcessorAdapter(ProcessorAdapter):
    image_token = "<imgpad>"
    processor_settings = {"crop_to_patches": bool, "min_patches": int, "max_patches": int, "multi_page": bool}

    @property
    def multi_page(self) -> bool:
        return bool(self.processor_kwargs.get("multi_page"))

    def item_positions(self, mm_inputs: MultiModalInputs) -> list[int]:
        """Each image's tiles (one without crop_to_patches) times the positions of a page."""
        page = page_positions(self.hf_config.vision_config)
        return [page * int(n) for n in mm_inputs["num_patches"]]

    def items(self, processed: MultiModalInputs) -> MultiModalInputs:
        return {"pixel_values": processed["pixel_values"], "num_patches": processed["num_patches"]}

    def hf_model_inputs(self, mm_inputs: MultiModalInputs) -> MultiModalInputs:
        return {"pixel_values": mm_inputs["pixel_values"]}

    def prompt_images(self, images: list[Image.Image]) -> list:
        return [images] if self.multi_page and images else images

    def check_placeholders(self, prompt: str, images: list, videos: list) -> None:
        """One placeholder per image, or one for all the pages of a multi-page prompt."""
        if not self.multi_page:
            return super().check_placeholders(prompt, images, videos)
        if images and prompt.count(self.image_token) != 1:
            raise UserError(f"with multi_page the prompt holds one {self.image_token} for all its pages, and it has "
                            f"{prompt.count(self.image_token)}")

    def process(self, prompt: str, images: list[Image.Image],
                videos: list | None = None) -> tuple[list[int], MultiModalInputs | None]:
        """GOT's processor with the settings given; each image's tile count as its image processor counts it."""
        if self.hf_processor is None or not images:
            return super().process(prompt, images, videos)
        self.check_placeholders(prompt, images, videos or [])
        out = self.hf_processor(text=prompt, images=self.prompt_images(images), return_tensors="pt",
                                **self.processor_kwargs)
        ids = out["input_ids"][0].tolist()
        tiling = self.tiling()
        tiles = [self.image_processor.get_number_of_image_patches(image.height, image.width, tiling)
                 for image in images]
        mm_inputs = {"pixel_values": out["pixel_values"], "num_patches": torch.tensor(tiles)}
        if ids.count(self.mm_token_id) != sum(self.item_positions(mm_inputs)):
            raise UserError(f"GOT's processor expands the pages to {ids.count(self.mm_token_id)} positions but "
                            f"their tiles yield {sum(self.item_positions(mm_inputs))}; the processor's settings do "
                            f"not match the model's")
        return ids, mm_inputs

    def image_inputs(self, images: list[Image.Image]) -> MultiModalInputs:
        tiling = self.tiling()
        processed = self.image_processor(images=images, return_tensors="pt", **tiling)
        return self.items(processed)

    def tiling(self) -> dict:
        return {**_TILING, **{k: v for k, v in self.processor_kwargs.items() if k in _TILING}}

    def fallback_image_processor(self):
        """A square resize to the encoder's input, OpenAI CLIP's mean and std (the hub's preprocessor_config)."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        size = self.hf_config.vision_config.image_size
        return GotOcr2ImageProcessorPil(size={"height": size, "width": size})

    def fallback_chat_prompt(self, text: str, num_images: int, num_videos: int = 0) -> str:
        """GOT's conversation as its processor writes it: one `<img><imgpad></img>` per image, or one for all the
        pages of a multi-page document."""
        pages = f"<img>{self.image_token}</img>" * (min(num_images, 1) if self.multi_page else num_images)
        return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|><|im_start|>user\n{pages}\n{text}<|im_end|>"
                f"<|im_start|>assistant\n")

    def placeholder_ids(self, positions: int, video: bool = False) -> list[int]:
        """One page in a synthetic prompt, framed by <img> and </img> as the processor frames it."""
        pad = super().placeholder_ids(positions, video)
        if self.tokenizer is None:
            return pad
        start, end = self.tokenizer.convert_tokens_to_ids(["<img>", "</img>"])
        return [start] + pad + [end]
