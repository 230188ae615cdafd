"""Prompts and images -> token ids and pixel values, through the model folder's own HF processor
(tokenizer, chat template, CLIP preprocessing); nothing here re-implements them."""
import os

import torch
from PIL import Image
from transformers import AutoProcessor

from vllm_utils.errors import UserError



def load_image(path: str) -> Image.Image:
    if not os.path.isfile(path):
        raise UserError(f"image '{path}' does not exist; pass --input-image a readable image file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image '{path}' ({type(e).__name__}); pass a PNG/JPEG/... image file") from None


class MultiModalProcessor:
    def __init__(self, folder: str, image_token_index: int, features_per_image: int) -> None:
        try:
            self.hf_processor = AutoProcessor.from_pretrained(folder)
        except (OSError, ValueError, TypeError, KeyError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"'{folder}' lacks usable tokenizer/processor files ({reason}); "
                            f"use the complete Hugging Face model folder") from None
        self.tokenizer = getattr(self.hf_processor, "tokenizer", None)
        if self.tokenizer is None or not hasattr(self.hf_processor, "image_processor"):
            raise UserError(f"'{folder}' has no image processor/tokenizer pair; use a LLaVA model folder")
        self.image_token = getattr(self.hf_processor, "image_token", "<image>")
        self.image_token_index = image_token_index
        self.features_per_image = features_per_image
        if self.tokenizer.convert_tokens_to_ids(self.image_token) != image_token_index:
            raise UserError(f"the tokenizer's id for {self.image_token} differs from the config's image_token_index "
                            f"({image_token_index}); the folder mixes files of different models")

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def chat_prompt(self, text: str, num_images: int = 1) -> str:
        """A user turn with images then text, rendered by the model's chat template."""
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
        if getattr(self.hf_processor, "chat_template", None):
            conversation = [{"role": "user", "content": content}]
            return self.hf_processor.apply_chat_template(conversation, add_generation_prompt=True)
        # What LLaVA-1.5's template renders, for folders that carry none.
        return "USER: " + (self.image_token + "\n") * num_images + text + " ASSISTANT:"

    def process(self, prompt: str, images: list[Image.Image]) -> tuple[list[int], torch.Tensor | None]:
        """Token ids with each image placeholder expanded to one position per image feature, and pixels."""
        placeholders = prompt.count(self.image_token)
        if placeholders != len(images):
            raise UserError(f"the prompt has {placeholders} {self.image_token} placeholder(s) but "
                            f"{len(images)} image(s) were given; put one {self.image_token} per image in the prompt")
        if not images:
            return self.tokenizer(prompt)["input_ids"], None
        out = self.hf_processor(text=prompt, images=images, return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        expanded = ids.count(self.image_token_index)
        if expanded != len(images) * self.features_per_image:
            raise UserError(f"the processor expands each image to {expanded // len(images)} positions but the "
                            f"vision tower yields {self.features_per_image} features; the processor config "
                            f"does not match the model config")
        return ids, out["pixel_values"]

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
