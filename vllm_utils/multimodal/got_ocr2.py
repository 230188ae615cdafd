"""GOT-OCR2's processor adapter: each page is resized to the encoder's square and takes the positions of one page;
the prompt is GOT's own conversation (the hub folder carries no chat template: its processor writes it), the user's
text as the OCR query after the page."""
from transformers import PretrainedConfig

from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.multimodal.processor import ProcessorAdapter

SYSTEM_PROMPT = "You should follow the instructions carefully and explain your answers in detail."


def page_positions(vision: PretrainedConfig) -> int:
    """Prompt positions of one page: the encoder's patch grid, halved twice by the projector's convolutions."""
    side = vision.image_size // vision.patch_size
    for _ in range(2):
        side = (side + 1) // 2  # kernel 3, stride 2, padding 1
    return side * side


class GotOcr2ProcessorAdapter(ProcessorAdapter):
    image_token = "<imgpad>"

    def item_positions(self, mm_inputs: MultiModalInputs) -> list[int]:
        return [page_positions(self.hf_config.vision_config)] * mm_inputs["pixel_values"].shape[0]

    def items(self, processed: MultiModalInputs) -> MultiModalInputs:
        return {"pixel_values": processed["pixel_values"]}

    def fallback_image_processor(self):
        """A square resize to the encoder's input, OpenAI CLIP's mean and std (the hub's preprocessor_config)."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        size = self.hf_config.vision_config.image_size
        return GotOcr2ImageProcessorPil(size={"height": size, "width": size})

    def fallback_chat_prompt(self, text: str, num_images: int, num_videos: int = 0) -> str:
        """GOT's conversation as its processor writes it, one `<img><imgpad></img>` per page."""
        pages = f"<img>{self.image_token}</img>" * num_images
        return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|><|im_start|>user\n{pages}\n{text}<|im_end|>"
                f"<|im_start|>assistant\n")

    def placeholder_ids(self, positions: int, video: bool = False) -> list[int]:
        """One page in a synthetic prompt, framed by <img> and </img> as the processor frames it."""
        pad = super().placeholder_ids(positions, video)
        if self.tokenizer is None:
            return pad
        start, end = self.tokenizer.convert_tokens_to_ids(["<img>", "</img>"])
        return [start] + pad + [end]
