"""The language models and vision towers real `llava` checkpoints use, each on a tiny random checkpoint shaped like
its hub config (the published values, sizes shrunk), against HF transformers: through the API and the CLI."""
import pytest
import torch
from PIL import Image

from vllm_utils import LLM, SamplingParams
from vllm_utils.bundled import BUNDLED

from conftest import HFReference, assert_bf16_close, chosen_logprobs, real_tokenizer_dir
from test_cli import cli

# name -> (the hub checkpoint it is shaped like, build_tiny_llava arguments)
BACKBONES = {
    "mistral": ("llava-hf/bakLlava-v1-hf", dict(
        text_type="mistral", text_config=dict(sliding_window=24, max_position_embeddings=32768))),
    "qwen2": ("llava-hf/llava-interleave-qwen-0.5b-hf", dict(
        text_type="qwen2", vision_type="siglip_vision_model", select_strategy="full", vision_feature_layer=-1,
        text_config=dict(tie_word_embeddings=True, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))),
    "gemma": ("Intel/llava-gemma-2b", dict(
        text_type="gemma", kv_heads=1, seed=7,
        text_config=dict(head_dim=256, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                         max_position_embeddings=8192))),
    "phi3": ("xtuner/llava-phi-3-mini-hf", dict(
        text_type="phi3", kv_heads=4, text_config=dict(sliding_window=24, max_position_embeddings=4096))),
    "qwen2-dynamic-rope": ("the Qwen2.5 decoder of OpenGVLab/InternVL3-1B-hf (dynamic NTK RoPE, factor 2)", dict(
        text_type="qwen2", vision_type="siglip_vision_model", select_strategy="full", vision_feature_layer=-1,
        text_config=dict(tie_word_embeddings=True, max_position_embeddings=512,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}))),
    "qwen3": ("the Qwen3 decoder of OpenGVLab/InternVL3_5-1B-HF (head_dim not hidden / heads)", dict(
        text_type="qwen3", vision_type="siglip_vision_model", select_strategy="full", vision_feature_layer=-1,
        text_config=dict(head_dim=32, tie_word_embeddings=True, max_position_embeddings=40960,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))),
    "llama-gelu": ("a Llama decoder with hidden_act gelu", dict(text_config=dict(hidden_act="gelu"))),
}
PROMPT = "Describe the picture in detail please."  # with the image: longer than the 24-token windows
NEW_TOKENS = 20


@pytest.fixture(scope="session", params=list(BACKBONES))
def backbone(request, tmp_path_factory) -> tuple[str, HFReference]:
    folder = str(tmp_path_factory.mktemp(request.param))
    kwargs = {"seed": 5, **BACKBONES[request.param][1]}
    from vllm_utils.testing.tiny_llava import build_tiny_llava

    build_tiny_llava(folder, real_tokenizer_dir(), **kwargs)
    return folder, HFReference(folder)


def _generate(llm: LLM, image: Image.Image):
    request = {"prompt": llm.engine.processor.chat_prompt(PROMPT), "multi_modal_data": {"image": image}}
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    return request, llm.generate([request], params, use_tqdm=False)[0]


def test_fp32_tokens_and_logprobs_equal_hf(backbone, images):
    folder, hf = backbone
    llm = LLM(folder, device="cpu", dtype="float32", max_model_len=512, block_size=4)
    request, out = _generate(llm, images[0])
    tokens = out.outputs[0].token_ids
    expected = hf.greedy(request, NEW_TOKENS, ignore_eos=True)
    assert len(set(expected)) > 3, "the reference repeats itself: it would prove nothing"
    assert tokens == expected
    reference = hf.token_logprobs(request, tokens)
    assert max(abs(a - b) for a, b in zip(chosen_logprobs(out.outputs[0]), reference)) < 1e-4


def test_bf16_logprobs_close_to_hf_fp32(backbone, images):
    """The request whose fp32 tokens the test above checks for variety."""
    folder, hf = backbone
    llm = LLM(folder, device="cpu", dtype="bfloat16", max_model_len=512)
    request, out = _generate(llm, images[0])
    assert_bf16_close(chosen_logprobs(out.outputs[0]), folder, request, out.outputs[0].token_ids, hf)


def test_cli_demo_prints_what_hf_generates(backbone, tmp_path):
    folder, hf = backbone
    path = tmp_path / "picture.png"
    Image.new("RGB", (90, 60), (200, 40, 90)).save(path)
    run = cli("--demo", f"--model={folder}", "--device=cpu", f"--input-image={path}", f"--prompt={PROMPT}",
              "--dtype=float32", f"--output-len={NEW_TOKENS}")
    assert run.returncode == 0, run.stderr
    tokens = hf.greedy({"prompt": hf.chat_prompt(PROMPT), "multi_modal_data": {"image": Image.open(path).convert("RGB")}},
                       NEW_TOKENS)
    text = hf.decode(tokens)
    assert f"Generated text: {text!r}," in run.stdout, run.stdout


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_configs_are_accepted_and_load_every_tensor_hf_would_save(name):
    """Each bundled configuration resolves, and our model built from it (on the meta device) takes every tensor
    of HF's model of the same configuration, in shape, and needs none that HF lacks."""
    from transformers import AutoModelForImageTextToText

    from vllm_utils.config import EngineConfig
    from vllm_utils.engine.model_runner import build_model
    from vllm_utils.engine.resolve import resolve
    from vllm_utils.loader import expected_targets, resolve_target, targets_filled
    from vllm_utils.models.registry import family

    config = resolve(EngineConfig(name, load_format="dummy"))
    ours = build_model(config.hf_config, family(config.model_type).model, torch.device("meta"), torch.float16)
    with torch.device("meta"):
        theirs = AutoModelForImageTextToText.from_config(config.hf_config)
    params, filled = dict(ours.named_parameters(remove_duplicate=False)), set()
    first_name = {id(p): n for n, p in reversed(list(params.items()))}  # tied parameters: the name loading fills
    for key, tensor in theirs.state_dict().items():
        target = resolve_target(ours, key)
        if target is None:
            continue
        assert target[0] in params, f"{key} -> {target[0]} is no parameter"
        if target[1] is None and params[target[0]].shape != tensor.shape:
            assert targets_filled(ours, *target) != [target], f"{key}: {tensor.shape} vs {params[target[0]].shape}"
        filled.update(targets_filled(ours, first_name[id(params[target[0]])], target[1]))
    assert filled == expected_targets(ours)
