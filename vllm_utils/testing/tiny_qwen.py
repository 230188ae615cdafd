"""Tiny random Qwen2-VL and Qwen2.5-VL checkpoints built locally (no hub access): test fixtures shaped like the
published checkpoints (their config values shrunk, their processor files and, by default, their weight key
names), with a tokenizer trained here on Qwen's special tokens."""
import os

import torch

from vllm_utils.testing.checkpoint import rewrite_keys, scale_weights, update_json, write_json

SYSTEM_PROMPT = "You are a helpful assistant."
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Renders like Qwen2-VL's template: a default system turn unless one is given, ChatML turns, one placeholder
# (expanded by the processor) per image or video, and the assistant header for add_generation_prompt.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = (
    "a photo of a cat sitting on a red chair next to the window . the rocket lifts off into a blue sky . "
    "describe the picture in detail . what is in this image ? a cup of coffee on a wooden table . "
    "describe this video . what happens after the dog jumps ? the car drives along the river at night . "
    "system user assistant You are a helpful assistant . please answer the question briefly and clearly . "
)


def train_qwen_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with Qwen2's special tokens, trained on a few sentences. Like Qwen2's, it adds
    no bos token; eos is <|im_end|> (the end of a chat turn) and padding <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN2_VL_CHAT_TEMPLATE,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})


def mrope_section(head_dim: int) -> list[int]:
    """Temporal, height and width shares of the rotary frequencies (head_dim / 2 in all), in the hub's
    proportions: [16, 24, 24] for head_dim 128, [2, 3, 3] for 16."""
    half = head_dim // 2
    temporal = max(1, round(half / 4))
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def build_tiny_qwen2_vl(folder: str, family: str = "qwen2_vl", layout: str = "hub", seed: int = 0,
                        text_layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                        vision_depth: int | None = None, vision_hidden: int = 32, vision_heads: int = 4,
                        tie_word_embeddings: bool = False, min_pixels: int = 56 * 56,
                        max_pixels: int = 28 * 28 * 64, fullatt_block_indexes: list[int] | None = None,
                        text_config: dict | None = None) -> str:
    """Writes config, processor files and random safetensors weights of a small Qwen2-VL (family "qwen2_vl") or
    Qwen2.5-VL ("qwen2_5_vl") to `folder`. Images are resized to between min_pixels and max_pixels (multiples of
    28 a side). layout: "hub" (visual.*, model.layers.*, lm_head.*, as the published checkpoints hold them),
    "prefixed" (model.visual.*, model.language_model.*, as transformers 4.52-4.5x write) or "saved" (whatever the
    installed transformers writes). text_config: more fields of the text model."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    if family not in ("qwen2_vl", "qwen2_5_vl") or layout not in ("hub", "prefixed", "saved"):
        raise ValueError(f"unknown family '{family}' or layout '{layout}'")
    tokenizer = train_qwen_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("vision_token_id", "<|vision_pad|>"))}
    qwen25 = family == "qwen2_5_vl"
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                hidden_act="silu", max_position_embeddings=128000 if qwen25 else 32768, rms_norm_eps=1e-6,
                use_sliding_window=False, sliding_window=32768, max_window_layers=text_layers,
                bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id,
                tie_word_embeddings=tie_word_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": mrope_section(hidden // heads)})
    text.update(text_config or {})
    vision = dict(depth=vision_depth or (4 if qwen25 else 3), num_heads=vision_heads, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    if qwen25:
        vision.update(hidden_size=vision_hidden, intermediate_size=88 * vision_hidden // 32, hidden_act="silu",
                      out_hidden_size=hidden, window_size=112, tokens_per_second=2,
                      fullatt_block_indexes=fullatt_block_indexes or [1, 3])
    else:
        vision.update(embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=4, hidden_act="quick_gelu")
    config = AutoConfig.for_model(family, text_config=text, vision_config=vision,
                                  tie_word_embeddings=tie_word_embeddings, **ids)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    scale_weights(model, tie_word_embeddings)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    if layout != "saved":
        _rewrite_keys(folder, layout)
    _save_processor(folder, family, tokenizer, min_pixels, max_pixels)
    return folder


def demo_qwen2_vl(folder: str) -> str:
    """The demo's default Qwen2-VL (testing/default_model.py)."""
    return build_tiny_qwen2_vl(folder, family="qwen2_vl")


def demo_qwen2_5_vl(folder: str) -> str:
    return build_tiny_qwen2_vl(folder, family="qwen2_5_vl")


# our canonical prefix (the module names of transformers 5) -> the prefix each layout writes
_LAYOUTS = {
    "hub": {"model.visual.": "visual.", "model.language_model.": "model.", "lm_head.": "lm_head."},
    "prefixed": {"model.visual.": "model.visual.", "model.language_model.": "model.language_model.",
                 "lm_head.": "lm_head."},
}


def canonical_key(key: str) -> str:
    """A weight name of any of the layouts as transformers 5 names the module."""
    for old, new in (("model.visual.", "model.visual."), ("visual.", "model.visual."),
                     ("model.language_model.", "model.language_model."), ("model.", "model.language_model.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _rewrite_keys(folder: str, layout: str) -> None:
    rewrite_keys(folder, _LAYOUTS[layout], canonical_key)


def _save_processor(folder: str, family: str, tokenizer, min_pixels: int, max_pixels: int) -> None:
    """The processor's files as the hub holds them, written part by part: transformers builds Qwen2VLProcessor
    only with torchvision (for its video processor)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor_class = "Qwen2_5_VLProcessor" if family == "qwen2_5_vl" else "Qwen2VLProcessor"
    tokenizer.save_pretrained(folder)
    images = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    images.save_pretrained(folder)
    limits = {"min_pixels": min_pixels, "max_pixels": max_pixels}  # the hub files spell them out at the top level
    update_json(os.path.join(folder, "preprocessor_config.json"), {**limits, "processor_class": processor_class})
    shared = images.to_dict()
    video = {key: shared[key] for key in ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean",
                                          "image_std", "merge_size", "patch_size", "resample", "rescale_factor",
                                          "temporal_patch_size")}
    video.update(video_processor_type="Qwen2VLVideoProcessor", processor_class=processor_class,
                 size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **limits, min_frames=4,
                 max_frames=16, do_sample_frames=False)
    write_json(os.path.join(folder, "video_preprocessor_config.json"), video)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(QWEN2_VL_CHAT_TEMPLATE)
    write_json(os.path.join(folder, "processor_config.json"), {"processor_class": processor_class})
