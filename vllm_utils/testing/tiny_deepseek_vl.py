"""Tiny random DeepSeek-VL and DeepSeek-VL-hybrid checkpoints built locally (no hub access), shaped like
deepseek-community/deepseek-vl-1.3b-chat and deepseek-vl-7b-chat (sizes shrunk): SigLIP at patch 16 with its
post-layernorm, a multi-head Llama decoder with tied embeddings, and for the hybrid a SAM ViT-B-style encoder whose
grid does not divide into its windows (as 64 patches do not into windows of 14), global layers among windowed
ones. Key layout as the hub's files (transformers 4.5x): `model.vision_model.vision_model.*`."""
import os

import torch

from vllm_utils.testing.checkpoint import rewrite_keys, scale_weights
from vllm_utils.testing.tiny_llava import train_tiny_tokenizer

IMAGE_TOKEN = "<image_placeholder>"
DEEPSEEK_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' }}{% else %}{{ 'Assistant: ' }}"
    "{% endif %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<image_placeholder>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{{ '\n\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tiny_deepseek_vl(folder: str, hybrid: bool = False, seed: int = 0, image_size: int = 96,
                           high_res_size: int = 128, layout: str = "hub") -> str:
    """Writes config, processor files and random safetensors weights of a small DeepSeek-VL (`hybrid`: with the
    SAM branch) to `folder`. layout: "hub" (model.vision_model.vision_model.*) or "saved" (what the installed
    transformers writes)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    tokenizer = train_tiny_tokenizer(image_token=IMAGE_TOKEN)
    vision = AutoConfig.for_model("siglip_vision_model", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                  num_hidden_layers=3, image_size=image_size, patch_size=16,
                                  hidden_act="gelu_pytorch_tanh")
    text = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                num_key_value_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
                                max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    extra = {}
    if hybrid:  # ViT-B's layout shrunk: windowed layers with a global one after every second
        extra["high_res_vision_config"] = AutoConfig.for_model(
            "sam_vision_model", hidden_size=32, mlp_dim=64, num_attention_heads=4, num_hidden_layers=4,
            image_size=high_res_size, patch_size=16, window_size=3, global_attn_indexes=[1, 3], output_channels=8,
        ).to_dict()
    config = AutoConfig.for_model("deepseek_vl_hybrid" if hybrid else "deepseek_vl", vision_config=vision.to_dict(),
                                  text_config=text.to_dict(), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                                  tie_word_embeddings=True, **extra)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    scale_weights(model, tied=True, tables=("pos_embed", "rel_pos_h", "rel_pos_w", "high_res_vision_alpha"))
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    if layout == "hub":
        rewrite_keys(folder, {"model.vision_model.": "model.vision_model.vision_model.", "": ""}, lambda key: key)
    _processor(hybrid, image_size, high_res_size, (image_size // 16) ** 2, tokenizer).save_pretrained(folder)
    return folder


def _processor(hybrid: bool, size: int, high_res_size: int, positions: int, tokenizer):
    square = {"height": size, "width": size}
    if hybrid:
        from transformers import DeepseekVLHybridProcessor
        from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import (
            DeepseekVLHybridImageProcessorPil)

        images = DeepseekVLHybridImageProcessorPil(size=square,
                                                   high_res_size={"height": high_res_size, "width": high_res_size})
        return DeepseekVLHybridProcessor(images, tokenizer, chat_template=DEEPSEEK_VL_CHAT_TEMPLATE,
                                         num_image_tokens=positions)
    from transformers import DeepseekVLProcessor
    from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil

    return DeepseekVLProcessor(DeepseekVLImageProcessorPil(size=square), tokenizer,
                               chat_template=DEEPSEEK_VL_CHAT_TEMPLATE, num_image_tokens=positions)


# The demo's default models (testing/default_model.py).
def demo_deepseek_vl(folder: str) -> str:
    return build_tiny_deepseek_vl(folder, seed=6)


def demo_deepseek_vl_hybrid(folder: str) -> str:
    return build_tiny_deepseek_vl(folder, hybrid=True, seed=6)
