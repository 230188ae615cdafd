"""A tiny random GOT-OCR2 checkpoint built locally (no hub access), shaped like stepfun-ai/GOT-OCR-2.0-hf (sizes
shrunk): SAM's ViT-B layout on the same 64 x 64 patch grid (smaller patches; windows of 14, so the grid is not a
whole number of windows) with global layers among windowed ones, the
projector's two convolutions, a multi-head Qwen2 decoder with tied embeddings; Qwen's special tokens and GOT's
<img>/<imgpad>/</img>; the processor files without a chat template, as the hub's (the processor writes GOT's
conversation itself). transformers writes the hub's key layout (4.49's): `vision_tower.*`, `multi_modal_projector.*`,
`language_model.model.*`."""
import os

import torch

from vllm_utils.testing.checkpoint import scale_weights, update_json

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<imgpad>"]
_CORPUS = (
    "OCR: OCR with format: the invoice total is 42 dollars . chapter one . the quick brown fox jumps over the lazy "
    "dog . system user assistant You should follow the instructions carefully and explain your answers in detail . "
    "page 3 of 12 . table of contents . figure 2 shows the results . 2024 annual report , revenue grew by 7 % . "
)


def train_got_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with Qwen's and GOT's special tokens, trained on a few sentences (no bos token;
    eos <|im_end|>, padding <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def build_tiny_got_ocr2(folder: str, seed: int = 0, image_size: int = 256) -> str:
    """Writes config, processor files and random safetensors weights of a small GOT-OCR2 to `folder`."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tokenizer = train_got_tokenizer()
    vision = dict(hidden_size=32, mlp_dim=64, num_attention_heads=4, num_hidden_layers=4, image_size=image_size,
                  patch_size=image_size // 64, window_size=14, global_attn_indexes=[1, 3], output_channels=8)
    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), rope_theta=1000000.0,
                max_position_embeddings=4096, max_window_layers=2, tie_word_embeddings=True,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model("got_ocr2", vision_config=vision, text_config=text,
                                  image_token_index=tokenizer.convert_tokens_to_ids("<imgpad>"),
                                  image_seq_length=256, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    scale_weights(model, tied=True, tables=("pos_embed", "rel_pos_h", "rel_pos_w"))
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    _save_processor(folder, GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}), tokenizer)
    return folder


def _save_processor(folder: str, images, tokenizer) -> None:
    """The hub's processor files: the tokenizer's, and preprocessor_config.json naming the processor class."""
    images.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    update_json(os.path.join(folder, "preprocessor_config.json"), {"processor_class": "GotOcr2Processor"})


def demo_got_ocr2(folder: str) -> str:
    """The demo's default model (testing/default_model.py)."""
    return build_tiny_got_ocr2(folder)
