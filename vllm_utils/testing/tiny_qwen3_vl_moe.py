"""A tiny random Qwen3-VL-MoE checkpoint built locally (no hub access): the tests' fixture and the family's demo
model, shaped like Qwen/Qwen3-VL-30B-A3B-Instruct (transformers' Qwen3VLMoeConfig values with the sizes shrunk:
8 experts, 2 chosen per token, experts narrower than the dense MLP, interleaved multimodal RoPE, DeepStack, an
untied LM head) with one dense layer among the sparse ones (`mlp_only_layers`), saved as transformers writes it
(the hub's keys: model.visual.*, model.language_model.*, each layer's experts fused into `gate_up_proj`
[experts, 2 * inter, hidden] and `down_proj` [experts, hidden, inter]: transformers' own orientation, where the
hub's files hold each expert transposed), with Qwen3-VL's tokenizer and processor
files (`tiny_qwen3_vl.py`)."""
import os

import torch

from vllm_utils.testing.checkpoint import scale_weights, write_json
from vllm_utils.testing.tiny_qwen import train_qwen_tokenizer
from vllm_utils.testing.tiny_qwen3_vl import QWEN3_VL_CHAT_TEMPLATE, save_processor

VARIED_SEED = 1  # HF's greedy tokens vary for photos and generated pictures alike


def build_tiny_qwen3_vl_moe(folder: str, seed: int = VARIED_SEED, text_layers: int = 3, hidden: int = 64,
                            heads: int = 4, kv_heads: int = 2, head_dim: int = 32, experts: int = 8, top_k: int = 2,
                            moe_intermediate: int = 48, dense_layers: tuple[int, ...] = (1,), vision_depth: int = 4,
                            vision_hidden: int = 32, vision_heads: int = 2, position_side: int = 6,
                            deepstack: tuple[int, ...] = (1, 2), min_pixels: int = 32 * 32 * 4,
                            max_pixels: int = 32 * 32 * 64) -> str:
    """Writes config, processor files and random safetensors weights of a small Qwen3-VL-MoE to `folder`; the
    layers `dense_layers` keep a dense MLP. Images and videos are sized as `tiny_qwen3_vl`'s."""
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
                attention_bias=False, tie_word_embeddings=False, bos_token_id=token("<|endoftext|>"),
                eos_token_id=token("<|im_end|>"), num_experts=experts, num_experts_per_tok=top_k,
                moe_intermediate_size=moe_intermediate, decoder_sparse_step=1, mlp_only_layers=list(dense_layers),
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": section,
                                 "mrope_interleaved": True})
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                  num_heads=vision_heads, hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                  num_position_embeddings=position_side**2, deepstack_visual_indexes=list(deepstack))
    config = AutoConfig.for_model("qwen3_vl_moe", text_config=text, vision_config=vision, tie_word_embeddings=False,
                                  **ids)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    scale_weights(model, False, tables=("pos_embed.weight",))
    with torch.no_grad():  # scale_weights sizes a 3-D tensor's entries by a whole expert: unit outputs per expert
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.normal_(0, p.shape[-1] ** -0.5)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)  # transformers 5 writes the hub's keys
    save_processor(folder, tokenizer, min_pixels, max_pixels)
    eos = [token("<|im_end|>"), token("<|endoftext|>")]  # as the hub's generation_config.json lists them
    write_json(os.path.join(folder, "generation_config.json"), {"eos_token_id": eos, "pad_token_id": eos[1]})
    return folder


def demo_qwen3_vl_moe(folder: str) -> str:
    """The demo's default Qwen3-VL-MoE (testing/default_model.py), of a seed where HF's greedy tokens vary."""
    return build_tiny_qwen3_vl_moe(folder, seed=VARIED_SEED)
