"""Synthetic perf requests: one image plus random text, exactly `input_len` tokens in all."""
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vllm_utils.errors import UserError
from vllm_utils.multimodal.processor import MultiModalProcessor


@dataclass
class SyntheticRequest:
    prompt_token_ids: list[int]
    pixel_values: torch.Tensor
    num_image_tokens: int

    @property
    def num_text_tokens(self) -> int:
        return len(self.prompt_token_ids) - self.num_image_tokens


def min_input_len(features_per_image: int) -> int:
    return features_per_image + 2  # BOS + one text token + the image


def check_input_len(input_len: int, features_per_image: int) -> None:
    """Needs only the model's config: run it before the weights load."""
    if input_len < min_input_len(features_per_image):
        raise UserError(f"--input-len {input_len} is shorter than one image ({features_per_image} positions) "
                        f"plus BOS and one text token; use --input-len >= {min_input_len(features_per_image)}")


def synthetic_requests(processor: MultiModalProcessor, input_len: int, count: int, image: Image.Image | None,
                       seed: int) -> list[SyntheticRequest]:
    """BOS, one random token, the image positions, then random tokens up to `input_len`. The random token
    before the image makes every request's prefix differ, so no prefix could be shared."""
    check_input_len(input_len, processor.features_per_image)
    image = image or Image.new("RGB", processor.image_size)
    pixels = processor.pixel_values([image])
    vocab = np.array(processor.text_token_ids())
    rng = np.random.default_rng(seed)
    n_image = processor.features_per_image
    requests = []
    for _ in range(count):
        text = rng.choice(vocab, input_len - 1 - n_image).tolist()
        ids = [processor.bos_token_id, text[0]] + [processor.image_token_index] * n_image + text[1:]
        requests.append(SyntheticRequest(ids, pixels, n_image))
    return requests
