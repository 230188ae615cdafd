"""Tiny random LLaVA, LLaVA-NeXT and LLaVA-OneVision checkpoints built locally (no hub access), shaped like the
hub's: the test fixtures and the demo's default models. Tokenizer: the real Llama one when a folder holding it is
given, else one trained here."""
import os

import torch

from vllm_utils.testing.checkpoint import rewrite_keys

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_CORPUS = (
    "a photo of a cat sitting on a red chair next to the window . the rocket lifts off into a blue sky . "
    "describe the picture in detail . what is in this image ? a cup of coffee on a wooden table . "
    "an astronaut in a white suit holds a flag . the dog runs across the green field in the morning . "
    "USER: ASSISTANT: please answer the question briefly and clearly . there are two birds on the tree . "
)


def train_tiny_tokenizer(vocab_size: int = 400, image_token: str = "<image>"):
    """A byte-level BPE tokenizer with Llama's special tokens plus the image placeholder, trained on a few
    sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", image_token]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": image_token})


def build_tiny_llava(folder: str, real_tokenizer_dir: str | None = None, layout: str = "hub", seed: int = 0,
                     image_size: int = 56, text_layers: int = 2, hidden: int = 64,
                     vision_feature_layer: int | list[int] = -2, select_strategy: str = "default",
                     rope_parameters: dict | None = None, vision_hidden: int = 32, vision_heads: int = 4,
                     heads: int = 4, kv_heads: int = 2, text_type: str = "llama", text_config: dict | None = None,
                     vision_type: str = "clip_vision_model", family: str = "llava") -> str:
    """Writes config, processor and random safetensors weights of a small LLaVA to `folder`: a CLIP or SigLIP
    tower and a decoder of `text_type` (llama, mistral, qwen2, gemma, phi3; `text_config`: more of its fields).
    family: "llava" (1.5), "llava_next", "llava_onevision" or "llava_next_video" (any-resolution images: tiles of
    `image_size`, grid resolutions up to 3x3 tiles; the last two also videos, a `<video>` token appended to the
    vocabulary). layout: "hub" (language_model.model.*, vision_tower.vision_model.*),
    "prefixed" (model.language_model.*, as transformers 4.52-4.5x write), or "saved" (whatever the installed
    transformers writes)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir) if real_tokenizer_dir else train_tiny_tokenizer()
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    videos = family in VIDEO_FAMILIES
    if videos:  # after the others: their ids stay
        tokenizer.add_tokens(["<video>"], special_tokens=True)
    siglip = vision_type == "siglip_vision_model"
    vision = AutoConfig.for_model(vision_type, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                  num_attention_heads=vision_heads, num_hidden_layers=3, image_size=image_size,
                                  patch_size=14, hidden_act="gelu_pytorch_tanh" if siglip else "quick_gelu")
    if rope_parameters is None and family == "llava_next_video":  # as LLaVA-NeXT-Video-7B-hf's Vicuna stretches it
        rope_parameters = {"rope_type": "linear", "factor": 2.5, "rope_theta": 10000.0}
    text_fields = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, num_hidden_layers=text_layers, vocab_size=len(tokenizer),
                       max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    text = AutoConfig.for_model(text_type, **{**text_fields, **(text_config or {})})
    extra_token = 0 if siglip else 1  # CLIP's class token
    anyres = {} if family == "llava" else {"image_grid_pinpoints": _pinpoints(image_size)}
    if family == "llava_onevision":
        anyres["vision_aspect_ratio"] = "anyres_max_2"  # small, so that large images are shrunk
    if videos:
        anyres["video_token_index"] = tokenizer.convert_tokens_to_ids("<video>")
    if family == "llava_next_video":
        anyres.update(spatial_pool_mode="average", spatial_pool_stride=2)
    config = AutoConfig.for_model(family, vision_config=vision.to_dict(), text_config=text.to_dict(),
                                  image_token_index=image_token_index, vision_feature_layer=vision_feature_layer,
                                  vision_feature_select_strategy=select_strategy, pad_token_id=tokenizer.pad_token_id,
                                  image_seq_length=(image_size // 14) ** 2 + extra_token - (select_strategy == "default"),
                                  tie_word_embeddings=text.tie_word_embeddings, **anyres)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    with torch.no_grad():  # transformers' init is tiny; scale up so that logits are far from ties
        for name, p in model.named_parameters():
            if p.dim() > 1 and "embed" not in name:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5)
            elif p.dim() == 1:  # biases and norm scales off their defaults, so that loading them matters
                p.add_(torch.randn_like(p) * 0.1)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    if layout != "saved":
        _rewrite_keys(folder, layout)
    if videos:
        _save_video_family_processor(folder, family, image_size, tokenizer, select_strategy, extra_token, anyres)
    else:
        _processor(family, vision_type, image_size, tokenizer, select_strategy, extra_token, anyres).save_pretrained(folder)
    return folder


def _pinpoints(tile: int) -> list[list[int]]:
    """Grid resolutions (height, width) of 1x2 up to 3x3 tiles, as LLaVA-NeXT's list goes up to 2x2 / 1x3."""
    return [[tile * rows, tile * cols] for rows in (1, 2, 3) for cols in (1, 2, 3) if rows * cols > 1]


def _processor(family: str, vision_type: str, size: int, tokenizer, strategy: str, extra_token: int, anyres: dict):
    if family == "llava":
        from transformers import LlavaProcessor

        return LlavaProcessor(image_processor=_image_processor(vision_type, size), tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy=strategy, num_additional_image_tokens=extra_token,
                              chat_template=LLAVA_CHAT_TEMPLATE)
    if family == "llava_next":
        from transformers import LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        images = LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                            image_grid_pinpoints=anyres["image_grid_pinpoints"])
        return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                                  vision_feature_select_strategy=strategy, num_additional_image_tokens=extra_token,
                                  chat_template=LLAVA_CHAT_TEMPLATE)
    raise ValueError(f"no processor for family '{family}'")


VIDEO_FAMILIES = ("llava_onevision", "llava_next_video")


def _save_video_family_processor(folder: str, family: str, size: int, tokenizer, strategy: str, extra_token: int,
                                 anyres: dict) -> None:
    """The files of a LLaVA-OneVision or LLaVA-NeXT-Video processor as the hub holds them, written part by part:
    transformers builds these processors only with torchvision (for their video processors). The video processor
    as the hub's: OneVision resizes each frame to the tower's square, NeXT-Video its shortest edge then crops."""
    import json

    if family == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)

        images = LlavaOnevisionImageProcessorPil(size={"height": size, "width": size},
                                                 image_grid_pinpoints=anyres["image_grid_pinpoints"])
        video = {"size": {"height": size, "width": size}, "do_center_crop": False}
        processor = {"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": (size // 14) ** 2,
                     "vision_aspect_ratio": anyres["vision_aspect_ratio"]}
    else:
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        images = LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                            image_grid_pinpoints=anyres["image_grid_pinpoints"])
        video = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}, "do_center_crop": True}
        processor = {"processor_class": "LlavaNextVideoProcessor", "patch_size": 14,
                     "num_additional_image_tokens": extra_token}
    images.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(LLAVA_CHAT_TEMPLATE)
    processor.update(vision_feature_select_strategy=strategy, image_token="<image>", video_token="<video>")
    with open(os.path.join(folder, "processor_config.json"), "w") as f:
        json.dump(processor, f, indent=2)
    video.update(video_processor_type="LlavaOnevisionVideoProcessor" if family == "llava_onevision" else
                 "LlavaNextVideoVideoProcessor", do_resize=True, do_rescale=True, do_normalize=True, resample=3,
                 rescale_factor=1 / 255, image_mean=list(images.image_mean), image_std=list(images.image_std))
    with open(os.path.join(folder, "video_preprocessor_config.json"), "w") as f:
        json.dump(video, f, indent=2)


def _image_processor(vision_type: str, size: int):
    """The image processor the hub checkpoints with this tower carry, at `size`."""
    if vision_type == "siglip_vision_model":
        from transformers import SiglipImageProcessor

        return SiglipImageProcessor(size={"height": size, "width": size})
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


_LAYOUTS = {
    # our canonical prefix -> the prefix each layout writes
    "hub": {"language_model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
            "vision_tower.": "vision_tower.vision_model.", "multi_modal_projector.": "multi_modal_projector.",
            "image_newline": "image_newline"},
    "prefixed": {"language_model.": "model.language_model.", "lm_head.": "lm_head.",
                 "vision_tower.": "model.vision_tower.vision_model.",
                 "multi_modal_projector.": "model.multi_modal_projector.", "image_newline": "model.image_newline"},
}


def _rewrite_keys(folder: str, layout: str) -> None:
    from vllm_utils.models.llava import canonical_key

    rewrite_keys(folder, _LAYOUTS[layout], canonical_key)


# The demo's default models (testing/default_model.py): the shapes the tests use, with the trained tokenizer.
def demo_llava(folder: str) -> str:
    return build_tiny_llava(folder)


def demo_llava_next(folder: str) -> str:
    return build_tiny_llava(folder, family="llava_next", seed=11)


def demo_llava_onevision(folder: str) -> str:
    return build_tiny_llava(folder, family="llava_onevision", vision_type="siglip_vision_model", select_strategy="full",
                            vision_feature_layer=-1, text_type="qwen2", seed=12)


def demo_llava_next_video(folder: str) -> str:
    return build_tiny_llava(folder, family="llava_next_video", seed=17)
