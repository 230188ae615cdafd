"""A tiny random MiniCPM-V 4.6 checkpoint built locally (no hub access): the tests' fixture and the family's demo
model, shaped like openbmb/MiniCPM-V-4.6's layout (transformers' `MiniCPMV4_6Config`: a SigLIP tower of 14-px
patches with the window merger after layer `insert_layer_id`, downsample_mode 16x, one merger round, on Qwen3.5's
hybrid decoder of three Gated DeltaNet layers to one gated full-attention layer) with the sizes shrunk, saved in the
hub's key layout (model.vision_tower.*, model.merger.*, model.language_model.*, lm_head.*) with the processor's
files: the image processor's (slices of scale_resolution 112 here, 448 on the hub) and a tokenizer trained here on
Qwen's special tokens and MiniCPM-V's markers, named as the hub's tokenizer names them.

MiniCPM-V 4.7 (`model_type="minicpmv4_7"`, openbmb/MiniCPM-V-4.7-1B: transformers' `MiniCPMV4_7Config`, 4.6's
fields less drop_vision_last_layer, plus the ids of the markers its canvas M-RoPE pins, as its conversion script
stores them) is the same checkpoint with those ids, its architecture and processor class; no published 4.7 config is
at hand, so its sizes are 4.6's shrunk."""
import os

import torch

from vllm_utils.testing.checkpoint import scale_weights, update_json, write_json

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<image>", "</image>", "<slice>", "</slice>",
                  "<image_id>", "</image_id>", "<unk>"]
MARKERS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "image_start_token": "<image>",
           "image_end_token": "</image>", "slice_start_token": "<slice>", "slice_end_token": "</slice>",
           "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>"}
# ChatML turns; an image is its placeholder and a newline (the processor expands it)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|image_pad|>\\n' }}"
    "{% elif part['type'] == 'video' %}{{ '<|video_pad|>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = (
    "a photo of a cat sitting on a red chair next to the window . the rocket lifts off into a blue sky . "
    "describe the picture in detail . what is in this image ? a cup of coffee on a wooden table . 0 1 2 3 "
    "compare the two pictures . system user assistant please answer the question briefly and clearly . "
)
VARIED_SEED = 1  # HF's greedy tokens vary, and differ between the tests' prompts
VARIED_SEED_4_7 = 7  # the same for MiniCPM-V 4.7 (its canvas positions)
_ARCHITECTURES = {"minicpmv4_6": "MiniCPMV4_6ForConditionalGeneration",
                  "minicpmv4_7": "MiniCPMV4_7ForConditionalGeneration"}
_PROCESSORS = {"minicpmv4_6": "MiniCPMV4_6Processor", "minicpmv4_7": "MiniCPMV4_7Processor"}


def train_minicpmv_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer (no bos; eos <|im_end|>, padding <|endoftext|>) naming MiniCPM-V's markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", chat_template=CHAT_TEMPLATE, extra_special_tokens=MARKERS)


def build_tiny_minicpmv(folder: str, seed: int = VARIED_SEED, text_layers: int = 4, hidden: int = 64,
                        heads: int = 4, kv_heads: int = 2, head_dim: int = 64, linear_heads: int = 2,
                        vision_layers: int = 3, vision_hidden: int = 32, vision_heads: int = 2,
                        insert_layer_id: int = 1, position_side: int = 8, scale_resolution: int = 112,
                        max_slice_nums: int = 9, downsample_mode: str = "16x",
                        model_type: str = "minicpmv4_6") -> str:
    """Writes config, processor files and random safetensors weights of a small MiniCPM-V 4.6 (or 4.7, by
    `model_type`) to `folder`: decoder layers linear, linear, linear, full by default (the recurrent state carries
    across three layers); the window merger after vision layer `insert_layer_id` (layers before and after it)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    tokenizer = train_minicpmv_tokenizer()
    token = tokenizer.convert_tokens_to_ids
    rotated_half = head_dim // 8  # partial_rotary_factor 0.25; with 4.6's 1-D positions the sections split evenly
    section = [rotated_half - 2 * (rotated_half // 3), rotated_half // 3, rotated_half // 3]
    text = dict(model_type="qwen3_5_text", vocab_size=len(tokenizer), hidden_size=hidden,
                intermediate_size=3 * hidden, num_hidden_layers=text_layers,
                layer_types=["full_attention" if i % 4 == 3 else "linear_attention" for i in range(text_layers)],
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, hidden_act="silu",
                max_position_embeddings=32768, rms_norm_eps=1e-6, linear_conv_kernel_dim=4,
                linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=linear_heads,
                linear_num_value_heads=2 * linear_heads, tie_word_embeddings=False,
                bos_token_id=token("<|endoftext|>"), eos_token_id=token("<|im_end|>"),
                rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": section, "mrope_interleaved": True})
    vision = dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
                  num_attention_heads=vision_heads, image_size=14 * position_side, patch_size=14,
                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, window_kernel_size=[2, 2])
    [newline] = tokenizer("\n", add_special_tokens=False)["input_ids"]
    markers = {} if model_type == "minicpmv4_6" else dict(
        image_start_id=token("<image>"), image_end_id=token("</image>"), slice_start_id=token("<slice>"),
        slice_end_id=token("</slice>"), newline_id=newline)
    config = AutoConfig.for_model(model_type, text_config=text, vision_config=vision,
                                  insert_layer_id=insert_layer_id, image_size=scale_resolution,
                                  image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
                                  downsample_mode=downsample_mode, merge_kernel_size=[2, 2], merger_times=1,
                                  tie_word_embeddings=False, **markers)
    config.architectures = [_ARCHITECTURES[model_type]]
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    scale_weights(model, False, tables=("position_embedding.weight",))
    with torch.no_grad():  # decays and rates as transformers initialises them, so the state neither dies nor explodes
        model.model.merger.mlp[0].linear_2.weight.mul_(3.0)  # image rows as large as token embeddings: they matter
        # logit 0 for the placeholders (never the greedy pick), as a trained model never writes them: HF's
        # teacher-forced log-probs would take a generated one for an image position
        model.lm_head.weight[[config.image_token_id, config.video_token_id]] = 0
        for layer in model.model.language_model.layers:
            if hasattr(layer, "linear_attn"):
                layer.linear_attn.A_log.uniform_(0.01, 16).log_()
                layer.linear_attn.dt_bias.fill_(1.0)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _save_processor(folder, scale_resolution, max_slice_nums, downsample_mode, _PROCESSORS[model_type])
    eos = [token("<|im_end|>"), token("<|endoftext|>")]
    write_json(os.path.join(folder, "generation_config.json"), {"eos_token_id": eos, "pad_token_id": eos[1]})
    return folder


def _save_processor(folder: str, scale_resolution: int, max_slice_nums: int, downsample_mode: str,
                    processor_class: str) -> None:
    """The hub's processor files: the image processor's, the video processor's (4.6's, for 4.7 too) and the chat
    template."""
    common = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3,
              "rescale_factor": 1 / 255, "max_slice_nums": max_slice_nums, "scale_resolution": scale_resolution,
              "patch_size": 14, "slice_mode": True, "downsample_mode": downsample_mode, "use_image_id": True,
              "processor_class": processor_class}
    write_json(os.path.join(folder, "preprocessor_config.json"),
               {**common, "image_processor_type": "MiniCPMV4_6ImageProcessor"})
    write_json(os.path.join(folder, "video_preprocessor_config.json"),
               {**common, "video_processor_type": "MiniCPMV4_6VideoProcessor", "max_num_frames": 64})
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    update_json(os.path.join(folder, "tokenizer_config.json"), {"processor_class": processor_class})


def demo_minicpmv(folder: str) -> str:
    """The demo's default MiniCPM-V (testing/default_model.py), of a seed where HF's greedy tokens vary."""
    return build_tiny_minicpmv(folder, seed=VARIED_SEED)


def demo_minicpmv4_7(folder: str) -> str:
    """The demo's default MiniCPM-V 4.7, of a seed where HF's greedy tokens vary."""
    return build_tiny_minicpmv(folder, seed=VARIED_SEED_4_7, model_type="minicpmv4_7")
