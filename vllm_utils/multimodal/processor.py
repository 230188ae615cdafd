"""Prompts and images -> token ids and pixel values, through the model folder's own HF processor
(tokenizer, chat template, CLIP preprocessing); nothing here re-implements them."""
import os

import torch
from PIL import Image
from transformers import AutoProcessor, PretrainedConfig

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
    """The folder's HF processor. With `allow_missing` (random-weight benchmarks) a folder holding only
    config.json still works for pre-tokenized requests: a CLIP image processor is built from the config."""

    def __init__(self, folder: str, hf_config: PretrainedConfig, features_per_image: int,
                 allow_missing: bool = False) -> None:
        self.folder = folder
        self.image_token_index = hf_config.image_token_index
        self.features_per_image = features_per_image
        self.hf_processor = self.tokenizer = self.image_processor = None
        self.image_token = "<image>"
        try:
            self.hf_processor = AutoProcessor.from_pretrained(folder)
            self.tokenizer = getattr(self.hf_processor, "tokenizer", None)
            self.image_processor = getattr(self.hf_processor, "image_processor", None)
        except (OSError, ValueError, TypeError, KeyError) as e:
            if not allow_missing:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"'{folder}' lacks usable tokenizer/processor files ({reason}); "
                                f"use the complete Hugging Face model folder") from None
        if self.tokenizer is None or self.image_processor is None:
            if not allow_missing:
                raise UserError(f"'{folder}' has no image processor/tokenizer pair; use a LLaVA model folder")
            self.tokenizer, self.image_processor = None, clip_image_processor(hf_config.vision_config.image_size)
        else:
            self.image_token = getattr(self.hf_processor, "image_token", "<image>")
            if self.tokenizer.convert_tokens_to_ids(self.image_token) != self.image_token_index:
                raise UserError(f"the tokenizer's id for {self.image_token} differs from the config's "
                                f"image_token_index ({self.image_token_index}); the folder mixes files of different models")
        text = hf_config.text_config
        self.vocab_size = text.vocab_size
        self.bos_token_id = self.tokenizer.bos_token_id if self.tokenizer else getattr(text, "bos_token_id", 1)
        self.eos_token_id = self.tokenizer.eos_token_id if self.tokenizer else getattr(text, "eos_token_id", 2)

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise UserError(f"'{self.folder}' has no tokenizer files: text prompts need them (only --perf works "
                            f"without them, with --load-format dummy)")

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the images the vision tower takes."""
        crop = getattr(self.image_processor, "crop_size", None) or {}
        size = crop.get("height") or self.image_processor.size.get("shortest_edge")
        return crop.get("width", size), size

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def text_token_ids(self) -> list[int]:
        """Ids of ordinary text tokens (no special or image token), for synthetic prompts."""
        special = set(self.tokenizer.all_special_ids) if self.tokenizer else {0, 1, 2}
        special |= {self.image_token_index, self.bos_token_id, self.eos_token_id}
        vocab = len(self.tokenizer) if self.tokenizer else self.vocab_size
        return [i for i in range(min(vocab, self.vocab_size)) if i not in special]

    def chat_prompt(self, text: str, num_images: int = 1) -> str:
        """A user turn with images then text, rendered by the model's chat template."""
        self._need_tokenizer()
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
        if getattr(self.hf_processor, "chat_template", None):
            conversation = [{"role": "user", "content": content}]
            return self.hf_processor.apply_chat_template(conversation, add_generation_prompt=True)
        # What LLaVA-1.5's template renders, for folders that carry none.
        return "USER: " + (self.image_token + "\n") * num_images + text + " ASSISTANT:"

    def process(self, prompt: str, images: list[Image.Image]) -> tuple[list[int], torch.Tensor | None]:
        """Token ids with each image placeholder expanded to one position per image feature, and pixels."""
        self._need_tokenizer()
        placeholders = prompt.count(self.image_token)
        if placeholders != len(images):
            raise UserError(f"the prompt has {placeholders} {self.image_token} placeholder(s) but "
                            f"{len(images)} image(s) were given; a raw prompt needs exactly one {self.image_token} "
                            f"per image, where the image belongs (the chat template of --demo adds it for you)")
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
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer else ""


def clip_image_processor(image_size: int):
    """CLIP preprocessing for a folder that carries no processor files (OpenAI CLIP's mean and std)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
