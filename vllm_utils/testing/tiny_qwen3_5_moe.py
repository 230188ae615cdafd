"""A tiny random Qwen3.5-MoE checkpoint built locally (no hub access): the tests' fixture and the family's demo
model, shaped like Qwen/Qwen3.5-35B-A3B's layout (transformers' `Qwen3_5MoeConfig` defaults: Qwen3.5's three Gated
DeltaNet layers to one gated full-attention layer, RoPE on a quarter of each head in [11, 11, 10] interleaved
proportions, twice as many linear-attention value heads as key heads; experts in every layer, several chosen per
token, a shared expert as wide as one expert, an untied LM head) with the sizes shrunk, saved as transformers writes
it (model.visual.*, model.language_model.*, each layer's experts fused into `gate_up_proj` [experts, 2 * inter,
hidden] and `down_proj` [experts, hidden, inter]) with Qwen3-VL's processor files."""
import os

import torch

from vllm_utils.testing.checkpoint import scale_weights, write_json
from vllm_utils.testing.tiny_qwen import train_qwen_tokenizer
from vllm_utils.testing.tiny_qwen3_vl import QWEN3_VL_CHAT_TEMPLATE, save_processor

VARIED_SEED = 0  # HF's greedy tokens vary, and differ between the tests' prompts, for photos and generated pictures


def build_tiny_qwen3_5_moe(folder: str, seed: int = VARIED_SEED, text_layers: int = 4, hidden: int = 64,
                           heads: int = 4, kv_heads: int = 2, head_dim: int = 64, experts: int = 8, top_k: int = 2,
                           moe_intermediate: int = 48, shared_intermediate: int = 48, linear_key_heads: int = 2,
                           linear_value_heads: int = 4, linear_dim: int = 16, vision_depth: int = 2,
                           vision_hidden: int = 32, vision_heads: int = 2, position_side: int = 6,
                           min_pixels: int = 32 * 32 * 4, max_pixels: int = 32 * 32 * 64) -> str:
    """Writes config, processor files and random safetensors weights of a small Qwen3.5-MoE to `folder`: layers of
    types linear, linear, linear, full by default, each with `experts` experts (`top_k` a token) and a shared one."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    tokenizer = train_qwen_tokenizer()
    tokenizer.chat_template = QWEN3_VL_CHAT_TEMPLATE
    token = tokenizer.convert_tokens_to_ids
    ids = {"image_token_id": token("<|image_pad|>"), "video_token_id": token("<|video_pad|>"),
           "vision_start_token_id": token("<|vision_start|>"), "vision_end_token_id": token("<|vision_end|>")}
    rotated_half = head_dim // 8  # partial_rotary_factor 0.25: the hub's [11, 11, 10] of 32, in proportion
    height = round(rotated_half * 11 / 32)
    section = [height, height, rotated_half - 2 * height]
    layer_types = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(text_layers)]
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=text_layers, layer_types=layer_types,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, hidden_act="silu",
                max_position_embeddings=262144, rms_norm_eps=1e-6, linear_conv_kernel_dim=4,
                linear_key_head_dim=linear_dim, linear_value_head_dim=linear_dim,
                linear_num_key_heads=linear_key_heads, linear_num_value_heads=linear_value_heads,
                num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=moe_intermediate,
                shared_expert_intermediate_size=shared_intermediate, tie_word_embeddings=False,
                bos_token_id=token("<|endoftext|>"), eos_token_id=token("<|im_end|>"),
                rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": section, "mrope_interleaved": True})
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                  num_heads=vision_heads, hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                  num_position_embeddings=position_side**2)
    config = AutoConfig.for_model("qwen3_5_moe", text_config=text, vision_config=vision, tie_word_embeddings=False,
                                  **ids)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    scale_weights(model, False, tables=("pos_embed.weight",))
    with torch.no_grad():
        for name, p in model.named_parameters():  # unit outputs per expert (scale_weights sizes by the whole bank)
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.normal_(0, p.shape[-1] ** -0.5)
        for layer in model.model.language_model.layers:  # decays and rates as transformers initialises them
            if hasattr(layer, "linear_attn"):
                layer.linear_attn.A_log.uniform_(0.01, 16).log_()
                layer.linear_attn.dt_bias.fill_(1.0)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    save_processor(folder, tokenizer, min_pixels, max_pixels)
    eos = [token("<|im_end|>"), token("<|endoftext|>")]
    write_json(os.path.join(folder, "generation_config.json"), {"eos_token_id": eos, "pad_token_id": eos[1]})
    return folder


def demo_qwen3_5_moe(folder: str) -> str:
    """The demo's default Qwen3.5-MoE (testing/default_model.py), of a seed where HF's greedy tokens vary."""
    return build_tiny_qwen3_5_moe(folder, seed=VARIED_SEED)
