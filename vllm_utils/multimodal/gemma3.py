"""Gemma 3's processor adapter. A prompt marks each image with `<start_of_image>` (the chat template writes it); the
processor expands it to "\\n\\n<start_of_image>", `mm_tokens_per_image` soft tokens and "<end_of_image>\\n\\n". With
pan and scan (`do_pan_and_scan`) a wide or tall image is also cut into 2 to `pan_and_scan_max_num_crops` crops of at
least `pan_and_scan_min_crop_size` pixels when its aspect ratio reaches `pan_and_scan_min_ratio_to_activate`: the
image is then "Here is the original image" followed by its crops, each framed as an image. One image is one item:
its rows are the image and its crops (`num_crops` of them, carried where pan and scan is on)."""
import numpy as np
import torch
from PIL import Image
from transformers import PretrainedConfig
from transformers.models.gemma3.processing_gemma3 import Gemma3Processor

from vllm_utils.errors import UserError
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.multimodal.processor import ProcessorAdapter

BOI, EOI = "<start_of_image>", "<end_of_image>"


class Gemma3ProcessorAdapter(ProcessorAdapter):
    soft_token = "<image_soft_token>"  # the tokenizer's image_token: what the processor expands each image to
    processor_settings = {"do_pan_and_scan": bool, "pan_and_scan_min_crop_size": int,
                          "pan_and_scan_max_num_crops": int, "pan_and_scan_min_ratio_to_activate": float}

    def __init__(self, folder: str, hf_config: PretrainedConfig, allow_missing: bool = False,
                 processor_kwargs: dict | None = None) -> None:
        super().__init__(folder, hf_config, allow_missing, processor_kwargs)  # checks <start_of_image>'s id
        self.mm_token_id = hf_config.image_token_index  # the soft token the prompt's positions are
        if self.tokenizer is not None:
            soft = getattr(self.tokenizer, "image_token", None) or "<image_soft_token>"
            if self.tokenizer.convert_tokens_to_ids(soft) != self.mm_token_id:
                raise UserError(f"the tokenizer's id for {soft} differs from the config's image_token_index "
                                f"({self.mm_token_id}); the folder mixes files of different models")
            self.soft_token = soft

    @property
    def image_token(self) -> str:
        """What a prompt holds per image, whatever the processor or tokenizer calls its image token."""
        return BOI

    @image_token.setter
    def image_token(self, value: str) -> None:
        pass  # the base class takes the processor's (the same) or the tokenizer's (the soft token): kept BOI

    @staticmethod
    def config_image_token_id(hf_config: PretrainedConfig) -> int:
        """The id of the prompt's placeholder, `<start_of_image>` (the base class checks the tokenizer's)."""
        return hf_config.boi_token_index

    def check_processor_kwargs(self, model_type: str) -> None:
        super().check_processor_kwargs(model_type)
        ratio = self.processor_kwargs.get("pan_and_scan_min_ratio_to_activate")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 1):
            raise UserError(f"mm_processor_kwargs 'pan_and_scan_min_ratio_to_activate' = {ratio!r}: it takes a "
                            f"number >= 1")

    # ---- pan and scan ------------------------------------------------------------------------------
    def pan_and_scan(self) -> dict:
        """The settings in force, as Gemma3Processor passes them to its image processor: its own defaults (over
        whatever the image processor's file holds: null on the hub), then the user's."""
        defaults = {name: Gemma3Processor.images_kwargs[name] for name in self.processor_settings}
        return {**defaults, **self.processor_kwargs}

    def num_crops(self, image: Image.Image) -> int:
        """The crops HF's image processor cuts `image` into (it decides from the size alone)."""
        settings = self.pan_and_scan()
        if not settings["do_pan_and_scan"]:
            return 0
        empty = np.empty((0, image.height, image.width), np.uint8)  # channels first, as it reads them
        return len(self.image_processor.pan_and_scan(empty, settings["pan_and_scan_min_crop_size"],
                                                     settings["pan_and_scan_max_num_crops"],
                                                     settings["pan_and_scan_min_ratio_to_activate"]))

    # ---- items -------------------------------------------------------------------------------------
    def item_positions(self, mm_inputs: MultiModalInputs) -> list[int]:
        """Each image's rows (itself and its crops) times the positions of one."""
        per_image = self.hf_config.mm_tokens_per_image
        if "num_crops" in mm_inputs:
            return [per_image * (1 + int(n)) for n in mm_inputs["num_crops"]]
        return [per_image] * mm_inputs["pixel_values"].shape[0]

    def items(self, processed: MultiModalInputs) -> MultiModalInputs:
        """pixel_values, and each image's crop count where pan and scan is on (every item one row otherwise)."""
        items = {"pixel_values": processed["pixel_values"]}
        if self.pan_and_scan()["do_pan_and_scan"]:
            items["num_crops"] = torch.as_tensor(processed["num_crops"]).reshape(-1)
        return items

    def hf_model_inputs(self, mm_inputs: MultiModalInputs) -> MultiModalInputs:
        return {"pixel_values": mm_inputs["pixel_values"]}

    def hf_token_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """token_type_ids: 1 at the image soft tokens (HF's model attends within each run of them both ways)."""
        return {"token_type_ids": (input_ids == self.mm_token_id).long()}

    def image_inputs(self, images: list[Image.Image]) -> MultiModalInputs:
        return self.items(self.image_processor(images=images, return_tensors="pt", **self.pan_and_scan()))

    # ---- prompts -----------------------------------------------------------------------------------
    def image_text(self, crops: int) -> str:
        """What Gemma3Processor writes for one image with `crops` crops."""
        image = f"\n\n{BOI}{self.soft_token * self.hf_config.mm_tokens_per_image}{EOI}\n\n"
        if not crops:
            return image
        return f"Here is the original image {image} and here are some crops to help you see better " + \
            " ".join([image] * crops)

    def process(self, prompt: str, images: list[Image.Image],
                videos: list | None = None) -> tuple[list[int], MultiModalInputs | None]:
        """HF's processor's tokens and pixels, with each image's crop count (which its output leaves out)."""
        if self.hf_processor is None or not images:
            return super().process(prompt, images, videos)
        self.check_placeholders(prompt, images, videos or [])
        out = self.hf_processor(text=prompt, images=images, return_tensors="pt", **self.processor_kwargs)
        ids = out["input_ids"][0].tolist()
        mm_inputs = self.items({"pixel_values": out["pixel_values"],
                                "num_crops": [self.num_crops(image) for image in images]})
        if ids.count(self.mm_token_id) != sum(self.item_positions(mm_inputs)):
            raise UserError(f"Gemma 3's processor expands the images to {ids.count(self.mm_token_id)} positions but "
                            f"their crops yield {sum(self.item_positions(mm_inputs))}; the processor's settings do "
                            f"not match the model's")
        return ids, mm_inputs

    def _expand(self, prompt: str, images: list[Image.Image]) -> tuple[list[int], MultiModalInputs]:
        """Gemma3Processor's expansion, where transformers cannot build it: each <start_of_image> replaced by the
        image's text, then tokenized."""
        processed = self.image_processor(images=images, return_tensors="pt", **self.pan_and_scan())
        crops = [int(n) for n in processed["num_crops"]]
        first, *rest = prompt.split(BOI)
        text = first + "".join(self.image_text(n) + piece for n, piece in zip(crops, rest))
        return self.tokenizer(text)["input_ids"], self.items(processed)

    def placeholder_ids(self, positions: int, video: bool = False) -> list[int]:
        """One image in a synthetic prompt: each of its rows' soft tokens framed by <start_of_image> and
        <end_of_image>, as the processor frames them."""
        per_image = self.hf_config.mm_tokens_per_image
        row = [self.hf_config.boi_token_index] + super().placeholder_ids(per_image, video) + \
            [self.hf_config.eoi_token_index]
        return row * (positions // per_image)

    def text_token_ids(self) -> list[int]:
        markers = {self.hf_config.boi_token_index, self.hf_config.eoi_token_index}
        return [t for t in super().text_token_ids() if t not in markers]

    def chat_prompt(self, text: str, num_images: int = 1, num_videos: int = 0) -> str:
        return self.without_template_bos(super().chat_prompt(text, num_images, num_videos))

    def render_chat(self, messages: list[dict], *args, **kwargs) -> str:
        return self.without_template_bos(super().render_chat(messages, *args, **kwargs))

    def without_template_bos(self, prompt: str) -> str:
        """Gemma's chat template writes <bos> and its tokenizer prepends one too: the rendered prompt leaves the
        template's out, so that its tokens start with one <bos>, as HF's apply_chat_template(tokenize=True) and
        vLLM's chat give them (not the two that tokenizing the rendered text again would)."""
        bos = self.tokenizer.bos_token
        adds_bos = self.tokenizer("")["input_ids"][:1] == [self.tokenizer.bos_token_id]
        return prompt[len(bos):] if bos and adds_bos and prompt.startswith(bos) else prompt

    def fallback_image_processor(self):
        """A square resize to the tower's input, mean and std 0.5 (the hub's preprocessor_config)."""
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        size = self.hf_config.vision_config.image_size
        return Gemma3ImageProcessorPil(size={"height": size, "width": size})

    def fallback_chat_prompt(self, text: str, num_images: int, num_videos: int = 0) -> str:
        """Gemma 3's chat template for one user turn."""
        return f"<bos><start_of_turn>user\n{BOI * num_images}{text.strip()}<end_of_turn>\n<start_of_turn>model\n"
