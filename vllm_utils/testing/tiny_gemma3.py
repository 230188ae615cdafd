"""A tiny random Gemma 3 checkpoint built locally (no hub access), shaped like google/gemma-3-4b-it (its config values
with the sizes shrunk): SigLIP on a 16 x 16 patch grid pooled 4 x 4 into 16 positions an image (the hub's 64 x 64
into 256), the Gemma 3 decoder with local layers among global ones (a sliding window shorter than the test prompts,
RoPE bases 1e4 and 1e6, the global layers' linear factor 8), QK-norm, a query_pre_attn_scalar that is not head_dim,
tied embeddings; Gemma's special tokens in Gemma's order (the image soft token last, as in the hub's vocabulary) and
its chat template; the processor's files. transformers 5 writes its own key layout (`model.language_model.*`,
`model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`); `layout="hub"` rewrites it into the
published checkpoints' (transformers 4.5x: `language_model.model.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`)."""
import os

import torch

from vllm_utils.testing.checkpoint import rewrite_keys, scale_weights, update_json, write_json

# Gemma's specials where the hub's vocabulary has them first (pad 0, eos 1, bos 2, unk 3), then the turn and image
# markers; the image soft token is appended after the trained vocabulary (262144, past the text, on the hub).
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
            "<end_of_image>"]
IMAGE_TOKEN = "<image_soft_token>"

# google/gemma-3-4b-it's chat template: an optional system turn folded into the first user turn, "model" for the
# assistant, <start_of_image> where each image goes (the processor expands it).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)
_CORPUS = (
    "a photo of a cat sitting on a red chair next to the window . the rocket lifts off into a blue sky . "
    "describe the picture in detail . what is in this image ? a cup of coffee on a wooden table . "
    "user model Here is the original image and here are some crops to help you see better . "
    "compare the two pictures . the dog runs across the green field in the morning . \n\n"
)
VARIED_SEED = 3  # HF's greedy tokens vary for photos and generated pictures alike
MM_TOKENS_PER_IMAGE = 16  # a 4 x 4 grid of pooled patches (16 x 16 on the hub)
SLIDING_WINDOW = 20  # longer than an image's 16 positions, shorter than every test prompt


def train_gemma3_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with Gemma's special tokens, trained on a few sentences; <bos> prepended as Gemma's
    tokenizer does; the image markers named as Gemma3Processor reads them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    tok.add_special_tokens([IMAGE_TOKEN])  # after the trained vocabulary, as the hub's 262144 comes after the text's
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", SPECIALS.index("<bos>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                        pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN,
                                                                                 "boi_token": "<start_of_image>",
                                                                                 "eoi_token": "<end_of_image>"})
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    return tokenizer


def build_tiny_gemma3(folder: str, seed: int = VARIED_SEED, layout: str = "hub", image_size: int = 64) -> str:
    """Writes config, processor files and random safetensors weights of a small Gemma 3 to `folder`. layout: "hub"
    (the published checkpoints') or "saved" (transformers 5's)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    tokenizer = train_gemma3_tokenizer()
    token = tokenizer.convert_tokens_to_ids
    eos = [token("<eos>"), token("<end_of_turn>")]
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=48,
                max_position_embeddings=4096, rms_norm_eps=1e-6, sliding_window=SLIDING_WINDOW,
                layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_theta=1000000.0,
                rope_local_base_freq=10000.0, bos_token_id=token("<bos>"), eos_token_id=eos,
                pad_token_id=token("<pad>"))
    patch = image_size // 16  # a 16 x 16 grid, pooled 4 x 4 into 16 positions
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_hidden_layers=2, image_size=image_size, patch_size=patch, vision_use_head=False,
                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    config = AutoConfig.for_model("gemma3", text_config={"model_type": "gemma3_text", **text}, vision_config=vision,
                                  mm_tokens_per_image=MM_TOKENS_PER_IMAGE, image_token_index=token(IMAGE_TOKEN),
                                  boi_token_index=token("<start_of_image>"), eoi_token_index=token("<end_of_image>"),
                                  eos_token_id=eos, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    scale_weights(model, tied=True)
    _scale_gemma(model, text["hidden_size"])
    with torch.no_grad():  # the image's soft token scores 0 through the tied head: never generated (a generated one
        # would count as a placeholder in HF's teacher-forced log-probs); its embedding is never read
        model.get_input_embeddings().weight[config.image_token_index] = 0
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    if layout == "hub":
        _rewrite_hub_keys(folder)
    save_processor(folder, tokenizer, image_size)
    write_json(os.path.join(folder, "generation_config.json"),
               {"bos_token_id": token("<bos>"), "eos_token_id": eos, "pad_token_id": token("<pad>")})
    return folder


def _scale_gemma(model: torch.nn.Module, hidden: int) -> None:
    """Gemma's norms scale by (1 + weight) and its embeddings by sqrt(hidden): the final norm's scale gets random
    sign (weight about -1, so that a token is not its own best successor through the tied head), the norms after
    attention and after the MLP scale their outputs to the embeddings' size (so that the layers, not the last
    token alone, lead the residual stream), and the image rows come out about as large (so that images matter)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("language_model.norm.weight"):
                p.normal_(-1.0, 1.0)
            elif name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
                p.add_(hidden**0.5 - 1)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 1.0)


def save_processor(folder: str, tokenizer, image_size: int) -> None:
    """The processor's files as the hub holds them: the image processor's (pan and scan left to the processor's
    defaults, null as on the hub), the tokenizer's with the chat template, and processor_config.json."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    update_json(os.path.join(folder, "preprocessor_config.json"),
                {"processor_class": "Gemma3Processor", "image_processor_type": "Gemma3ImageProcessor",
                 "do_pan_and_scan": None, "pan_and_scan_min_crop_size": None, "pan_and_scan_max_num_crops": None,
                 "pan_and_scan_min_ratio_to_activate": None})
    tokenizer.save_pretrained(folder)
    write_json(os.path.join(folder, "processor_config.json"),
               {"image_seq_length": MM_TOKENS_PER_IMAGE, "processor_class": "Gemma3Processor"})


def _rewrite_hub_keys(folder: str) -> None:
    from vllm_utils.models.llava import canonical_key

    rewrite_keys(folder, {"language_model.": "language_model.model.", "vision_tower.": "vision_tower.vision_model.",
                          "multi_modal_projector.": "multi_modal_projector."}, canonical_key)


def demo_gemma3(folder: str) -> str:
    """The demo's default Gemma 3 (testing/default_model.py), of a seed where HF's greedy tokens vary."""
    return build_tiny_gemma3(folder, seed=VARIED_SEED)
