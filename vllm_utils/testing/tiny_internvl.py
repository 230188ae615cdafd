"""A tiny random InternVL checkpoint built locally (no hub access), shaped like OpenGVLab/InternVL3-1B-hf (sizes
shrunk): InternViT's layout (class token, position table, LayerNorm blocks with layer scale and q/k/v biases) on
224-pixel tiles of 16 x 16 patches, so that the 0.5 pixel shuffle makes 64 positions a tile; the projector; a Qwen2
decoder with grouped-query attention and tied embeddings (`text_type` "qwen3": InternVL3.5's; "llama": the
Llama-format decoder of InternVL3-9B and InternVL2.5-8B). `large_vision` gives the tower of InternVL3-38B/78B
(InternViT-6B's switches: RMSNorm blocks, q/k RMSNorm, no q/k/v biases) and untied embeddings. The tokenizer is
trained here on Qwen's special tokens and InternVL's (`<img>`, `</img>`, `<IMG_CONTEXT>`, ..., `<video>` last,
beyond the embedding table, as the hub's); the processor files are the hub's (tiles of the tower's size, the
ImageNet mean and std, at most 12 tiles and a thumbnail). `layout` "hub" writes InternVL3-*-hf's key layout
(`vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`: what transformers 5 writes too);
"prefixed" InternVL3_5-*-HF's (`model.*`, `lm_head.*`)."""
import os

import torch

from vllm_utils.testing.checkpoint import rewrite_keys, scale_weights, update_json, write_json

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<quad>",
                  "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
# the hub's chat_template.jinja: ChatML turns, `<IMG_CONTEXT>` per image and `<video>` per video, each on a line
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = (
    "a photo of a cat sitting on a red chair next to the window . the rocket lifts off into a blue sky . "
    "describe the picture in detail . what is in this image ? a cup of coffee on a wooden table . Frame1: Frame2: "
    "describe this video . what happens in the frames ? <ref> the dog </ref> <box> [[1, 2, 3, 4]] </box> . "
    "system user assistant please answer the question briefly and clearly . "
)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# seeds whose greedy tokens vary with the shared photos and with the generated pictures: the default checkpoint's,
# the large tower's, the Qwen3 decoder's, the Llama decoder's
VARIED_SEED, LARGE_SEED, QWEN3_SEED, LLAMA_SEED = 1, 4, 5, 1


def train_internvl_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with Qwen2's and InternVL's special tokens, trained on a few sentences (no bos;
    eos <|im_end|>, padding <|endoftext|>), naming InternVL's image and video tokens as the hub's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})


def tiny_config(tokenizer, text_type: str = "qwen2", large_vision: bool = False, tile: int = 224,
                vision_layers: int = 2, vision: dict | None = None, **overrides):
    """The InternVL config of the tiny checkpoint (vision: more vision fields; overrides: more top-level ones)."""
    from transformers import AutoConfig

    vision_fields = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_hidden_layers=vision_layers, hidden_act="gelu", image_size=[tile, tile],
                         patch_size=[14, 14], layer_norm_eps=1e-6, layer_scale_init_value=0.1,
                         use_absolute_position_embeddings=True, use_mean_pooling=True,
                         attention_bias=not large_vision, use_qk_norm=large_vision,
                         norm_type="rms_norm" if large_vision else "layer_norm")
    vision_fields.update(vision or {})
    tied = not large_vision
    video_id = tokenizer.convert_tokens_to_ids("<video>")
    text = dict(model_type=text_type, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, num_hidden_layers=2, vocab_size=video_id, rope_theta=1000000.0,
                max_position_embeddings=8192, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=tied,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.pad_token_id,
                pad_token_id=tokenizer.pad_token_id)
    if text_type == "qwen3":
        text.update(head_dim=16, attention_bias=False)
    grid = tile // 14
    fields = dict(vision_config=vision_fields, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(
        "<IMG_CONTEXT>"), image_seq_length=(grid // 2) ** 2, downsample_ratio=0.5, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=tied)
    return AutoConfig.for_model("internvl", **{**fields, **overrides})


def build_tiny_internvl(folder: str, seed: int = 0, text_type: str = "qwen2", large_vision: bool = False,
                        layout: str = "hub", max_patches: int = 12, **overrides) -> str:
    """Writes config, processor files and random safetensors weights of a small InternVL to `folder`."""
    from transformers import AutoModelForImageTextToText

    tokenizer = train_internvl_tokenizer()
    config = tiny_config(tokenizer, text_type, large_vision, **overrides)
    config.architectures = ["InternVLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    scale_weights(model, tied=config.tie_word_embeddings, tables=("position_embeddings", "cls_token"))
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    if layout == "prefixed":  # transformers 5 saves the hub's layout
        rewrite_keys(folder, {"vision_tower.": "model.vision_tower.", "multi_modal_projector.":
                              "model.multi_modal_projector.", "language_model.model.": "model.language_model.",
                              "language_model.lm_head.": "lm_head."}, lambda key: key)
    tokenizer.save_pretrained(folder)
    _save_processor(folder, config, max_patches)
    return folder


def _save_processor(folder: str, config, max_patches: int) -> None:
    """The hub's processor files: the image processor's (GOT-OCR2's, tiles of the tower's size), the video
    processor's, processor_config.json (positions per tile) and chat_template.jinja."""
    height, width = config.vision_config.image_size
    common = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
              "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "processor_class": "InternVLProcessor",
              "resample": 3, "rescale_factor": 1 / 255, "size": {"height": height, "width": width}}
    write_json(os.path.join(folder, "preprocessor_config.json"),
               {**common, "crop_to_patches": False, "min_patches": 1, "max_patches": max_patches,
                "image_processor_type": "GotOcr2ImageProcessorFast"})
    write_json(os.path.join(folder, "video_preprocessor_config.json"),
               {**common, "video_processor_type": "InternVLVideoProcessor", "initial_shift": True,
                "do_sample_frames": False})
    write_json(os.path.join(folder, "processor_config.json"),
               {"image_seq_length": config.image_seq_length, "processor_class": "InternVLProcessor"})
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    update_json(os.path.join(folder, "tokenizer_config.json"), {"processor_class": "InternVLProcessor"})


def demo_internvl(folder: str) -> str:
    """The demo's default model (testing/default_model.py)."""
    return build_tiny_internvl(folder, seed=VARIED_SEED)
