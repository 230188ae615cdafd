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
    return image_positions + 2  # BOS + one text token + the images


def check_input_len(input_len: int, image_positions: int) -> None:
    """Needs only the processor (no weights): run it before the weights load."""
    if input_len < min_input_len(image_positions):
        raise UserError(f"--input-len {input_len} is shorter than the request's images ({image_positions} positions) "
                        f"plus BOS and one text token; use --input-len >= {min_input_len(image_positions)}")


def parse_vision_shapes(text: str | None) -> list[tuple[int, int]]:
    """--input-vision-shape "H,W" or "H,W;H,W;..." -> [(height, width), ...]."""
    if not text:
        return []
    shapes = []
    for part in text.split(";"):
        try:
            height, width = (int(v) for v in part.split(","))
        except ValueError:
            raise UserError(f"--input-vision-shape '{text}': give HEIGHT,WIDTH in pixels, ';' between images "
                            f"(e.g. 672,672 or 336,672;672,336)") from None
        if height < 1 or width < 1:
            raise UserError(f"--input-vision-shape '{text}': sizes must be >= 1 pixel")
        shapes.append((height, width))
    return shapes


def request_images(processor: ProcessorAdapter, files: list[Image.Image], shapes: list[tuple[int, int]],
                   count: int) -> list[Image.Image]:
    """The `count` images of every synthetic request: the given pictures (repeated in turn), else black ones of
    `shapes` (one per image; one shape serves all), else of the processor's own size."""
    if files:
        return [files[i % len(files)] for i in range(count)]
    if shapes and len(shapes) not in (1, count):
        raise UserError(f"--input-vision-shape gives {len(shapes)} sizes for --mm-per-prompt {count} images; give "
                        f"one size, or one per image")
    sizes = [(w, h) for h, w in shapes] or [processor.image_size]
    return [Image.new("RGB", sizes[i % len(sizes)]) for i in range(count)]


def image_positions(processor: ProcessorAdapter, images: list[Image.Image]) -> tuple[MultiModalInputs, int]:
    """The tensors of the images of one request, and the prompt positions they take in all."""
    mm_inputs = processor.image_inputs(images)
    return mm_inputs, sum(processor.item_positions(mm_inputs))


def synthetic_requests(processor: ProcessorAdapter, input_len: int, count: int, images: list[Image.Image] | None,
                       seed: int) -> list[SyntheticRequest]:
    """BOS, one random token, each image's positions, then random tokens up to `input_len`. The random token
    before the images makes every request's prefix differ, so no prefix could be shared. `images` None: one
    black image of the processor's size."""
    mm_inputs, n_image = image_positions(processor, images or request_images(processor, [], [], 1))
    check_input_len(input_len, n_image)
    positions = processor.item_positions(mm_inputs)
    vocab = np.array(processor.text_token_ids())
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(count):
        text = rng.choice(vocab, input_len - 1 - n_image).tolist()
        ids = [processor.bos_token_id, text[0]]
        for n in positions:
            ids += [processor.mm_token_id] * n
        requests.append(SyntheticRequest(ids + text[1:], mm_inputs, n_image))
    return requests


def perf_images(args, processor: ProcessorAdapter) -> list[Image.Image]:
    """The images of every --perf request, from the flags."""
    from vllm_utils.multimodal.image import load_image

    files = [load_image(path) for path in args.input_image]
    return request_images(processor, files, parse_vision_shapes(args.input_vision_shape), args.mm_per_prompt)
