"""Synthetic perf requests: one image plus random text, exactly `input_len` tokens in all."""
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vllm_utils.errors import UserError
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.multimodal.processor import ProcessorAdapter


@dataclass
class SyntheticRequest:
    prompt_token_ids: list[int]
    mm_inputs: MultiModalInputs
    num_image_tokens: int

    @property
    def num_text_tokens(self) -> int:
        return len(self.prompt_token_ids) - self.num_image_tokens

    def as_prompt(self) -> dict:
        """The request as `LLM.generate` takes it."""
        return {"prompt_token_ids": self.prompt_token_ids, "mm_inputs": self.mm_inputs}


def min_input_len(image_positions: int) -> int:
    return image_positions + 2  # BOS + one text token + the image


def check_input_len(input_len: int, image_positions: int) -> None:
    """Needs only the processor (no weights): run it before the weights load."""
    if input_len < min_input_len(image_positions):
        raise UserError(f"--input-len {input_len} is shorter than one image ({image_positions} positions) "
                        f"plus BOS and one text token; use --input-len >= {min_input_len(image_positions)}")


def image_positions(processor: ProcessorAdapter, image: Image.Image | None) -> tuple[MultiModalInputs, int]:
    """The synthetic image's tensors (black, of the processor's size, unless `image` is given) and its positions."""
    mm_inputs = processor.image_inputs([image or Image.new("RGB", processor.image_size)])
    return mm_inputs, sum(processor.item_positions(mm_inputs))


def synthetic_requests(processor: ProcessorAdapter, input_len: int, count: int, image: Image.Image | None,
                       seed: int) -> list[SyntheticRequest]:
    """BOS, one random token, the image positions, then random tokens up to `input_len`. The random token
    before the image makes every request's prefix differ, so no prefix could be shared."""
    mm_inputs, n_image = image_positions(processor, image)
    check_input_len(input_len, n_image)
    vocab = np.array(processor.text_token_ids())
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(count):
        text = rng.choice(vocab, input_len - 1 - n_image).tolist()
        ids = [processor.bos_token_id, text[0]] + [processor.mm_token_id] * n_image + text[1:]
        requests.append(SyntheticRequest(ids, mm_inputs, n_image))
    return requests
