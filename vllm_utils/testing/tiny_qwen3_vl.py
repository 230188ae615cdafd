"""A tiny random Qwen3-VL checkpoint built locally (no hub access): the tests' fixture and the family's demo model,
shaped like Qwen/Qwen3-VL-2B-Instruct (its config values with the sizes shrunk: interleaved multimodal RoPE in the
hub's [24, 20, 20] proportions, DeepStack from two vision blocks, tied embeddings, a learned position table smaller
than the grids so that it is always resampled), saved in the hub's key layout (model.visual.*,
model.language_model.*), with a tokenizer trained here on Qwen's special tokens, the processor's files and the chat
template."""
import os

import torch

from vllm_utils.testing.checkpoint import scale_weights, update_json, write_json
from vllm_utils.testing.tiny_qwen import train_qwen_tokenizer

# Renders as Qwen3-VL's template does for these parts: ChatML turns (no default system turn), one placeholder
# (expanded by the processor) per image or video between the vision markers, and the assistant header.
QWEN3_VL_CHAT_TEMPLATE = (
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
VARIED_SEED = 0  # HF's greedy tokens vary for photos and generated pictures alike


def build_tiny_qwen3_vl(folder: str, seed: int = VARIED_SEED, text_layers: int = 3, hidden: int = 64,
                        heads: int = 4, kv_heads: int = 2, head_dim: int = 32, vision_depth: int = 4,
                        vision_hidden: int = 32, vision_heads: int = 2, position_side: int = 6,
                        deepstack: tuple[int, ...] = (1, 2), min_pixels: int = 32 * 32 * 4,
                        max_pixels: int = 32 * 32 * 64) -> str:
    """Writes config, processor files and random safetensors weights of a small Qwen3-VL to `folder`. Images are
    resized to between min_pixels and max_pixels (sides multiples of 32): at most 64 prompt positions an image by
    default; a video's frames so that all of them together take at most twice that."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    tokenizer = train_qwen_tokenizer()
    tokenizer.chat_template = QWEN3_VL_CHAT_TEMPLATE
    token = tokenizer.convert_tokens_to_ids
    ids = {"image_token_id": token("<|image_pad|>"), "video_token_id": token("<|video_pad|>"),
           "vision_start_token_id": token("<|vision_start|>"), "vision_end_token_id": token("<|vision_end|>")}
    half = head_dim // 2  # the hub's [24, 20, 20] of 64 frequencies, in proportion
    height = round(half * 20 / 64)
    section = [half - 2 * height, height, height]
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=head_dim, hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6,
                attention_bias=False, tie_word_embeddings=True, bos_token_id=token("<|endoftext|>"),
                eos_token_id=token("<|im_end|>"),
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": section,
                                 "mrope_interleaved": True})
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                  num_heads=vision_heads, hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                  num_position_embeddings=position_side**2, deepstack_visual_indexes=list(deepstack))
    config = AutoConfig.for_model("qwen3_vl", text_config=text, vision_config=vision, tie_word_embeddings=True,
                                  **ids)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    scale_weights(model, True, tables=("pos_embed.weight",))
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)  # transformers 5 writes the hub's layout
    save_processor(folder, tokenizer, min_pixels, max_pixels)
    eos = [token("<|im_end|>"), token("<|endoftext|>")]  # as the hub's generation_config.json lists them
    write_json(os.path.join(folder, "generation_config.json"), {"eos_token_id": eos, "pad_token_id": eos[1]})
    return folder


def demo_qwen3_vl(folder: str) -> str:
    """The demo's default Qwen3-VL (testing/default_model.py), of a seed where HF's greedy tokens vary."""
    return build_tiny_qwen3_vl(folder, seed=VARIED_SEED)


def save_processor(folder: str, tokenizer, min_pixels: int, max_pixels: int) -> None:
    """The processor's files as the hub holds them, written part by part: transformers builds Qwen3VLProcessor
    only with torchvision (for its video processor)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer.save_pretrained(folder)
    images = Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=16,
                                      temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    images.save_pretrained(folder)
    update_json(os.path.join(folder, "preprocessor_config.json"), {"processor_class": "Qwen3VLProcessor"})
    shared = images.to_dict()
    video = {key: shared[key] for key in ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean",
                                          "image_std", "merge_size", "patch_size", "resample", "rescale_factor",
                                          "temporal_patch_size")}
    video.update(video_processor_type="Qwen3VLVideoProcessor", processor_class="Qwen3VLProcessor",
                 size={"shortest_edge": 2 * min_pixels, "longest_edge": 2 * max_pixels}, do_sample_frames=False,
                 fps=2, min_frames=4, max_frames=768)
    write_json(os.path.join(folder, "video_preprocessor_config.json"), video)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(QWEN3_VL_CHAT_TEMPLATE)
    write_json(os.path.join(folder, "processor_config.json"), {"processor_class": "Qwen3VLProcessor"})
