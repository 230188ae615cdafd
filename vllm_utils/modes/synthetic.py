"""Synthetic perf requests: images (or a video) plus random text, exactly `input_len` tokens in all."""
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


def check_input_len(input_len: int, mm_positions: int, fixed: int, what: str = "images") -> None:
    """`fixed`: the prompt tokens besides one text token that are not free text (BOS, the items' positions and
    the tokens framing them). Needs only the processor (no weights): run it before the weights load."""
    if input_len < fixed + 1:
        extra = fixed - mm_positions
        parts = (["BOS"] if extra == 1 else [f"{extra} framing/BOS tokens"] if extra > 1 else []) + ["one text token"]
        raise UserError(f"--input-len {input_len} is shorter than the request's {what} ({mm_positions} positions) "
                        f"plus {' and '.join(parts)}; use --input-len >= {fixed + 1}")


def request_images(processor: ProcessorAdapter, files: list[Image.Image], shapes: list[tuple[int, int]],
                   count: int) -> list[Image.Image]:
    """The `count` images of every synthetic request: the given pictures (repeated in turn), else black ones of
    `shapes` (one per image; one shape serves all), else of the processor's own size."""
    if files:
        return [files[i % len(files)] for i in range(count)]
    sizes = [(w, h) for h, w in shapes] or [processor.image_size]
    return [Image.new("RGB", sizes[i % len(sizes)]) for i in range(count)]


@dataclass(frozen=True)
class RequestItems:
    """One request's pictures (or video), processed once for every request that carries them."""

    mm_inputs: MultiModalInputs
    placeholders: list[list[int]]  # each item's prompt tokens
    positions: int  # the multimodal positions, in all
    fixed: int  # the prompt tokens that are not free text: BOS (where there is one) and every item's tokens


def request_items(processor: ProcessorAdapter, images: list[Image.Image], video=None) -> RequestItems:
    if video is not None:
        mm_inputs = processor.video_inputs(video)
        placeholders = [processor.placeholder_ids(processor.item_positions(mm_inputs)[0], video=True)]
    else:
        mm_inputs = processor.image_inputs(images)
        placeholders = [processor.placeholder_ids(n) for n in processor.item_positions(mm_inputs)]
    bos = processor.bos_token_id is not None
    return RequestItems(mm_inputs, placeholders, sum(processor.item_positions(mm_inputs)),
                        bos + sum(len(p) for p in placeholders))


def image_positions(processor: ProcessorAdapter, images: list[Image.Image], video=None) -> tuple[MultiModalInputs, int]:
    """The tensors of the images (or video) of one request, and the prompt positions they take in all."""
    items = request_items(processor, images, video)
    return items.mm_inputs, items.positions


def synthetic_requests(processor: ProcessorAdapter, input_len: int, count: int, images: list[Image.Image] | None,
                       seed: int, video=None, items: RequestItems | None = None) -> list[SyntheticRequest]:
    """BOS (where the model has one), one random token, each item's tokens, then random tokens up to
    `input_len`. The random token before the items, another for each request, makes every request's prefix differ,
    so no prefix could be shared. `images` None: one black image of the processor's size; `video`: one video instead of images;
    `items`: those already processed."""
    if items is None:
        images = images or ([] if video is not None else request_images(processor, [], [], 1))
        items = request_items(processor, images, video)
    check_input_len(input_len, items.positions, items.fixed, "video" if video is not None else "images")
    vocab = np.array(processor.text_token_ids())
    rng = np.random.default_rng(seed)
    leads = rng.choice(vocab, count, replace=count > len(vocab)).tolist()  # one per request while the vocabulary lasts
    requests = []
    for lead in leads:
        text = rng.choice(vocab, input_len - items.fixed - 1).tolist()
        ids = ([processor.bos_token_id] if processor.bos_token_id is not None else []) + [lead]
        for tokens in items.placeholders:
            ids += tokens
        requests.append(SyntheticRequest(ids + text, items.mm_inputs, items.positions))
    return requests
