"""A tiny random GLM-4.1V checkpoint built locally (no hub access): the tests' fixture and the family's demo model,
shaped like zai-org/GLM-4.1V-9B-Thinking (its config values with the sizes shrunk: partial, interleaved multimodal
RoPE on half of each head, the vision tower's learned position grid of 336 / 14 patches a side), saved in the hub's
key layout (model.visual.*, model.language_model.*, lm_head.*), with a tokenizer trained here on GLM's special
tokens, the image processor's file and the chat template."""
import os

import torch

from vllm_utils.testing.checkpoint import scale_weights, update_json, write_json

SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                  "<|begin_of_video|>", "<|end_of_video|>", "<|image|>", "<|video|>"]
# Renders as GLM-4.1V's template does: the [gMASK]<sop> prefix, each turn after its role token, one placeholder
# (expanded by the processor) per image or video between its begin/end tokens, and the assistant header.
GLM4V_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' }}"
    "{% else %}{{ '<|system|>\\n' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|begin_of_image|><|image|><|end_of_image|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|begin_of_video|><|video|><|end_of_video|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
VARIED_SEED = 1  # HF's greedy tokens vary for photos and generated pictures alike (some seeds loop)
_CORPUS = (
    "a photo of a cat sitting on a red chair next to the window . the rocket lifts off into a blue sky . "
    "describe the picture in detail . what is in this image ? a cup of coffee on a wooden table . "
    "let me think about the question step by step . the answer is the red car near the river . "
    "system user assistant please answer the question briefly and clearly . "
)


def train_glm_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with GLM-4's special tokens, trained on a few sentences. Like GLM's, it adds no
    bos token (the chat template writes [gMASK]<sop>); eos and padding are <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        chat_template=GLM4V_CHAT_TEMPLATE, extra_special_tokens={"image_token": "<|image|>",
                                                                 "video_token": "<|video|>"})


def build_tiny_glm4v(folder: str, seed: int = 0, text_layers: int = 2, hidden: int = 128, heads: int = 4,
                     kv_heads: int = 2, vision_depth: int = 2, vision_hidden: int = 32, vision_heads: int = 2,
                     tie_word_embeddings: bool = False, min_pixels: int = 112 * 112,
                     max_pixels: int = 2 * 28 * 28 * 64) -> str:
    """Writes config, processor files and random safetensors weights of a small GLM-4.1V to `folder`. Images are
    resized so that twice their pixels (GLM counts the two temporal copies) lie within [min_pixels, max_pixels],
    sides multiples of 28: at most 64 prompt positions an image by default; a video's frames so that all of them
    together do."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    tokenizer = train_glm_tokenizer()
    token = tokenizer.convert_tokens_to_ids
    ids = {"image_token_id": token("<|image|>"), "video_token_id": token("<|video|>"),
           "image_start_token_id": token("<|begin_of_image|>"), "image_end_token_id": token("<|end_of_image|>"),
           "video_start_token_id": token("<|begin_of_video|>"), "video_end_token_id": token("<|end_of_video|>")}
    head_dim = hidden // heads
    pairs = head_dim // 4  # half the head rotates: head_dim / 4 frequencies, in the hub's [8, 12, 12] proportions
    temporal = max(1, pairs // 4)
    section = [temporal, (pairs - temporal) // 2, pairs - temporal - (pairs - temporal) // 2]
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                hidden_act="silu", max_position_embeddings=65536, rms_norm_eps=1e-5,
                pad_token_id=token("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": section})
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, num_heads=vision_heads, hidden_act="silu",
                  attention_bias=False, in_channels=3, image_size=336, patch_size=14, rms_norm_eps=1e-5,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                  intermediate_size=3 * hidden)
    config = AutoConfig.for_model("glm4v", text_config=text, vision_config=vision,
                                  tie_word_embeddings=tie_word_embeddings, **ids)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    scale_weights(model, tie_word_embeddings)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)  # transformers 5 writes the hub's layout
    _save_processor(folder, tokenizer, min_pixels, max_pixels)
    # every token that ends a reply, as the hub's generation_config.json lists them
    eos = [token(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    write_json(os.path.join(folder, "generation_config.json"), {"eos_token_id": eos, "pad_token_id": eos[0]})
    return folder


def demo_glm4v(folder: str) -> str:
    """The demo's default GLM-4.1V (testing/default_model.py), of a seed where HF's greedy tokens vary."""
    return build_tiny_glm4v(folder, seed=VARIED_SEED)


def _save_processor(folder: str, tokenizer, min_pixels: int, max_pixels: int) -> None:
    """The processor's files as the hub holds them, written part by part: transformers builds Glm4vProcessor only
    with torchvision (for its video processor)."""
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    tokenizer.save_pretrained(folder)
    images = Glm4vImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    images.save_pretrained(folder)
    update_json(os.path.join(folder, "preprocessor_config.json"), {"processor_class": "Glm4vProcessor"})
    # the video processor's file, written by hand: transformers builds Glm4vVideoProcessor only with torchvision
    shared = images.to_dict()
    video = {key: shared[key] for key in ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean",
                                          "image_std", "merge_size", "patch_size", "resample", "rescale_factor",
                                          "temporal_patch_size")}
    video.update(video_processor_type="Glm4vVideoProcessor", processor_class="Glm4vProcessor",
                 size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, do_sample_frames=False, fps=2,
                 max_duration=300)
    write_json(os.path.join(folder, "video_preprocessor_config.json"), video)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(GLM4V_CHAT_TEMPLATE)
    write_json(os.path.join(folder, "processor_config.json"), {"processor_class": "Glm4vProcessor"})
