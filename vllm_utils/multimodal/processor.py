"""Prompts and images -> token ids and named multimodal tensors, through the model folder's own HF processor
(tokenizer, chat template, image preprocessing). A family's adapter adds what the engine needs beyond HF: how many
prompt positions each item takes; where transformers cannot build a folder's processor (without torchvision), the
adapter expands the placeholders itself from those counts, around HF's tokenizer and image processor."""
import os

import torch
from PIL import Image
from transformers import AutoProcessor, PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.multimodal.inputs import MultiModalInputs


class ProcessorAdapter:
    """The folder's HF processor. With `allow_missing` (random-weight benchmarks) a folder holding only
    config.json still works for pre-tokenized requests: the family builds an image processor from the config."""

    image_token = "<image>"
    video_token: str | None = None  # families that take videos name their placeholder
    # the HF processor's settings a family lets users change (mm_processor_kwargs), each a switch (bool) or a count
    # (int, >= 1); others are refused by name
    processor_settings: dict[str, type] = {}

    def __init__(self, folder: str, hf_config: PretrainedConfig, allow_missing: bool = False,
                 processor_kwargs: dict | None = None) -> None:
        self.folder = folder
        self.hf_config = hf_config
        self.processor_kwargs = dict(processor_kwargs or {})
        self.check_processor_kwargs(hf_config.model_type)
        self.mm_token_id = self.config_image_token_id(hf_config)
        self.hf_processor = self.tokenizer = self.image_processor = None
        self.chat_template = None
        try:
            self.hf_processor, self.tokenizer, self.image_processor = _load_hf_parts(folder)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as e:
            if not allow_missing:
                missing = [f for f in ("tokenizer_config.json", "preprocessor_config.json")
                           if not os.path.isfile(os.path.join(folder, f))]
                reason = f"no {' or '.join(missing)}" if missing else \
                    str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"'{folder}' lacks usable tokenizer/processor files ({reason}); use the complete "
                                f"Hugging Face model folder, or --load-format dummy for --perf on its config "
                                f"alone") from None
        if self.tokenizer is None or self.image_processor is None:
            if not allow_missing:
                raise UserError(f"'{folder}' has no image processor/tokenizer pair; use the complete Hugging Face "
                                f"model folder")
            self.tokenizer, self.image_processor = None, self.fallback_image_processor()
        else:
            self.image_token = getattr(self.hf_processor or self.tokenizer, "image_token", None) or self.image_token
            self.chat_template = getattr(self.hf_processor, "chat_template", None) or _chat_template_file(folder) \
                or getattr(self.tokenizer, "chat_template", None)
            if self.tokenizer.convert_tokens_to_ids(self.image_token) != self.mm_token_id:
                raise UserError(f"the tokenizer's id for {self.image_token} differs from the config's "
                                f"image_token_index ({self.mm_token_id}); the folder mixes files of different models")
        text = hf_config.text_config
        self.vocab_size = text.vocab_size
        self.bos_token_id = self.tokenizer.bos_token_id if self.tokenizer else getattr(text, "bos_token_id", 1)
        # a config-only folder: the config's EOS, which may list several (GLM-4.1V's)
        configured = _ids(getattr(text, "eos_token_id", 2))
        self.eos_token_id = self.tokenizer.eos_token_id if self.tokenizer else (configured or [None])[0]
        self.generation_config = json_file(folder, "generation_config.json")
        # every token that ends a reply: the tokenizer's EOS (else the config's) and those generation_config.json
        # lists (as vLLM takes)
        first = [self.eos_token_id] if self.tokenizer else configured
        listed = _ids(self.generation_config.get("eos_token_id"))
        self.eos_token_ids = list(dict.fromkeys([t for t in [*first, *listed] if t is not None]))

    def check_processor_kwargs(self, model_type: str) -> None:
        """Each setting one the family takes, of its type."""
        for name, value in sorted(self.processor_kwargs.items()):
            kind = self.processor_settings.get(name)
            if kind is None:
                takes = ", ".join(self.processor_settings) or "none"
                raise UserError(f"mm_processor_kwargs '{name}' is not a setting of {model_type}'s processor here "
                                f"(it takes: {takes})")
            if kind is bool and not isinstance(value, bool):
                raise UserError(f"mm_processor_kwargs '{name}' = {value!r}: it takes true or false")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"mm_processor_kwargs '{name}' = {value!r}: it takes a whole number >= 1")

    # ---- what a family defines -------------------------------------------------------------------
    @staticmethod
    def config_image_token_id(hf_config: PretrainedConfig) -> int:
        return hf_config.image_token_index

    def item_positions(self, mm_inputs: MultiModalInputs) -> list[int]:
        """The prompt positions each item of `mm_inputs` takes, in order."""
        raise NotImplementedError

    def fallback_image_processor(self):
        """An image processor built from the model config alone, for folders without processor files."""
        raise NotImplementedError

    def fallback_chat_prompt(self, text: str, num_images: int, num_videos: int = 0) -> str:
        """The prompt the family's chat template renders, for folders that carry none."""
        raise NotImplementedError

    def hf_model_inputs(self, mm_inputs: MultiModalInputs) -> MultiModalInputs:
        """One prompt's items as HF transformers' model takes them (for the HF reference backend)."""
        return mm_inputs

    def prompt_images(self, images: list[Image.Image]) -> list:
        """The images of one prompt as HF's processor takes them (a family with a multi-image mode nests them)."""
        return images

    def hf_token_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """What else HF transformers' model takes about a batch's token ids [batch, tokens]."""
        return {}

    def placeholder_ids(self, positions: int, video: bool = False) -> list[int]:
        """One item's tokens in a synthetic prompt."""
        if video:
            raise UserError(f"{self.hf_config.model_type} models take no video; give images, or use a video model")
        return [self.mm_token_id] * positions

    def items(self, processed: MultiModalInputs) -> MultiModalInputs:
        """The HF processor's image tensors for the images of one prompt, as the model takes them (each item's
        rows along dim 0, so that prompts concatenate)."""
        return processed

    # ---- shared ----------------------------------------------------------------------------------
    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise UserError(f"'{self.folder}' has no tokenizer files: text prompts need them (only --perf works "
                            f"without them, with --load-format dummy)")

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the images the processor produces by default (synthetic images take it)."""
        crop = getattr(self.image_processor, "crop_size", None) or {}
        size = dict(self.image_processor.size)
        if crop:
            return crop["width"], crop["height"]
        if "height" in size:
            return size["width"], size["height"]
        return size["shortest_edge"], size["shortest_edge"]

    def image_inputs(self, images: list[Image.Image]) -> MultiModalInputs:
        """The tensors of `images`, as the images of one prompt."""
        processed = self.image_processor(images=self.prompt_images(images), return_tensors="pt")
        return self.items({k: v for k, v in processed.items() if k != "batch_num_images"})

    def text_token_ids(self) -> list[int]:
        """Ids of ordinary text tokens (no special or image token), for synthetic prompts."""
        special = set(self.tokenizer.all_special_ids) if self.tokenizer else {0, 1, 2}
        special |= {self.mm_token_id, getattr(self, "video_token_id", None), self.bos_token_id, self.eos_token_id}
        vocab = len(self.tokenizer) if self.tokenizer else self.vocab_size
        return [i for i in range(min(vocab, self.vocab_size)) if i not in special]

    def chat_prompt(self, text: str, num_images: int = 1, num_videos: int = 0) -> str:
        """A user turn with images, then videos, then text, rendered by the model's chat template."""
        if num_videos and self.video_token is None:
            self.placeholder_ids(0, video=True)  # refuses
        self._need_tokenizer()
        content = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos + [{"type": "text", "text": text}]
        if not self.chat_template:
            return self.fallback_chat_prompt(text, num_images, num_videos)
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  chat_template=self.chat_template, add_generation_prompt=True)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, chat_template: str | None = None,
                    continue_final_message: bool = False, **template_kwargs) -> str:
        """A conversation (content parts `text`, `image`, `video`) rendered by the model's chat template."""
        self._need_tokenizer()
        template = chat_template or self.chat_template
        if not template:
            raise UserError(f"'{self.folder}' carries no chat template: pass chat_template=..., or a rendered prompt "
                            f"to generate()")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=continue_final_message, **template_kwargs)

    def check_placeholders(self, prompt: str, images: list, videos: list) -> None:
        """One placeholder in the prompt per image and per video given."""
        if videos and self.video_token is None:
            self.placeholder_ids(0, video=True)  # refuses
        for token, given, what in ((self.image_token, images, "image"), (self.video_token, videos, "video")):
            if token is not None and prompt.count(token) != len(given):
                raise UserError(f"the prompt has {prompt.count(token)} {token} placeholder(s) but {len(given)} "
                                f"{what}(s) were given; a raw prompt needs exactly one {token} per {what}, where it "
                                f"belongs (the chat template of --demo adds it for you)")

    def process(self, prompt: str, images: list[Image.Image],
                videos: list | None = None) -> tuple[list[int], MultiModalInputs | None]:
        """Token ids with each image placeholder expanded to the positions its image takes, and the images'
        tensors."""
        self._need_tokenizer()
        self.check_placeholders(prompt, images, videos or [])
        if not images:
            return self.tokenizer(prompt)["input_ids"], None
        if self.hf_processor is None:
            ids, mm_inputs = self._expand(prompt, images)
        else:
            out = self.hf_processor(text=prompt, images=self.prompt_images(images), return_tensors="pt",
                                    **self.processor_kwargs)
            ids = out["input_ids"][0].tolist()
            mm_inputs = self.items({k: v for k, v in out.items() if k not in ("input_ids", "attention_mask",
                                                                                "batch_num_images")})
        expanded, expected = ids.count(self.mm_token_id), sum(self.item_positions(mm_inputs))
        if expanded != expected:
            raise UserError(f"the processor expands the images to {expanded} positions but the vision tower "
                            f"yields {expected} features; the processor config does not match the model config")
        return ids, mm_inputs

    def _expand(self, prompt: str, images: list[Image.Image]) -> tuple[list[int], MultiModalInputs]:
        """What the HF processor does, where transformers cannot build it: each image's placeholder token repeated
        for the positions its image takes."""
        mm_inputs = self.image_inputs(images)
        counts = iter(self.item_positions(mm_inputs))
        ids = []
        for token in self.tokenizer(prompt)["input_ids"]:
            ids.extend([token] * next(counts) if token == self.mm_token_id else [token])
        return ids, mm_inputs

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens) if self.tokenizer else ""



def _load_hf_parts(folder: str) -> tuple[object | None, object, object]:
    """(processor, tokenizer, image processor) of a model folder. Where transformers cannot build the processor
    itself (LLaVA-OneVision's and Qwen2-VL's need torchvision for their video processors) the tokenizer and image
    processor are loaded alone, processor None."""
    try:
        processor = AutoProcessor.from_pretrained(folder)
        return processor, getattr(processor, "tokenizer", None), getattr(processor, "image_processor", None)
    except (AttributeError, ImportError, ValueError):
        from transformers import AutoImageProcessor, AutoTokenizer

        return None, AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)


def _ids(value: object) -> list[int]:
    """A token id field that may hold one id, a list of them, or nothing."""
    return list(value) if isinstance(value, list) else [value] if isinstance(value, int) else []


def json_file(folder: str, name: str) -> dict:
    """A folder's JSON file as a dict; {} where there is none or it cannot be read."""
    import json

    try:
        with open(os.path.join(folder, name)) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _chat_template_file(folder: str) -> str | None:
    """The processor's chat template as a folder stores it (chat_template.jinja or chat_template.json)."""
    jinja, json_file = os.path.join(folder, "chat_template.jinja"), os.path.join(folder, "chat_template.json")
    if os.path.isfile(jinja):
        with open(jinja) as f:
            return f.read()
    if os.path.isfile(json_file):
        import json

        with open(json_file) as f:
            return json.load(f).get("chat_template")
    return None
