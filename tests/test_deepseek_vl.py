"""DeepSeek-VL and DeepSeek-VL-hybrid against transformers' models on tiny random checkpoints shaped like the hub's:
one image, two images of different sizes in one prompt, text alone, all in one batch; chunked prefill through the
images; the processor's pixels and position counts; the CLI's --demo and --acc against HF."""
import json

import pytest
import torch
from PIL import Image

from vllm_utils import LLM, SamplingParams

from conftest import HFReference, assert_bf16_close, chosen_logprobs
from test_cli import cli

TOKENS = 16


@pytest.fixture(scope="module", params=["deepseek_vl", "deepseek_vl_hybrid"])
def tiny_deepseek(request, tmp_path_factory) -> str:
    from vllm_utils.testing.tiny_deepseek_vl import build_tiny_deepseek_vl

    return build_tiny_deepseek_vl(str(tmp_path_factory.mktemp(request.param)),
                                  hybrid=request.param == "deepseek_vl_hybrid", seed=6)


@pytest.fixture(scope="module")
def deepseek_reference(tiny_deepseek) -> HFReference:
    return HFReference(tiny_deepseek)


def engine(folder: str, **kwargs) -> LLM:
    return LLM(folder, device="cpu", dtype="float32", max_model_len=1024, **kwargs)


def requests(adapter, images: list[Image.Image]) -> list[dict]:
    """One image, two of different shapes (one tall: padded to a square), text alone."""
    cases = [("describe the picture", [images[0]]),
             ("what is in this image ?", [images[0], images[1].resize((100, 180))]),
             ("a cup of coffee on a wooden table", [])]
    return [{"prompt": adapter.chat_prompt(text, len(ims)), "multi_modal_data": {"image": ims}} for text, ims in cases]


def test_a_batch_of_images_and_text_gives_hfs_tokens_and_logprobs(tiny_deepseek, deepseek_reference, images):
    llm = engine(tiny_deepseek)
    reqs = requests(llm.engine.processor, images)
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate(reqs, params, use_tqdm=False)
    for req, out in zip(reqs, outputs):
        ours = out.outputs[0]
        assert ours.token_ids == deepseek_reference.greedy(req, TOKENS, ignore_eos=True)
        theirs = deepseek_reference.token_logprobs(req, ours.token_ids)
        assert max(abs(e[t].logprob - r) for e, t, r in zip(ours.logprobs, ours.token_ids, theirs)) < 1e-4
        assert len(set(ours.token_ids)) > 3  # the reference's tokens vary
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) == len(outputs)  # the images are seen


def test_prompts_prefilled_in_chunks_give_hfs_tokens(tiny_deepseek, deepseek_reference, images):
    """Chunks of 16 tokens: each image's 36 positions span three chunks."""
    llm = engine(tiny_deepseek, max_num_batched_tokens=16)
    req = requests(llm.engine.processor, images)[1]
    out = llm.generate(req, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == deepseek_reference.greedy(req, TOKENS, ignore_eos=True)


def test_bf16_logprobs_close_to_hf_fp32(tiny_deepseek, deepseek_reference, images):
    llm = LLM(tiny_deepseek, device="cpu", dtype="bfloat16", max_model_len=1024)
    req = requests(llm.engine.processor, images)[1]
    out = llm.generate(req, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    assert_bf16_close(chosen_logprobs(out), tiny_deepseek, req, out.token_ids, deepseek_reference)


@pytest.mark.parametrize("size", [(20, 20), (96, 96), (300, 40), (33, 500), (640, 480)])
def test_pixels_and_positions_equal_hfs_processor(tiny_deepseek, images, size):
    """The folder's processor (what the engine runs) and the one built from the config alone (config-only
    folders) make the same pixels; every image takes the positions HF's processor expands it to."""
    from transformers import AutoProcessor

    from vllm_utils.config import load_hf_config
    from vllm_utils.multimodal.deepseek_vl import DeepseekVLProcessorAdapter

    hf_config = load_hf_config(tiny_deepseek)
    adapter = DeepseekVLProcessorAdapter(tiny_deepseek, hf_config)
    image = images[1].resize(size)
    prompt = adapter.chat_prompt("what is this ?", 1)
    ids, ours = adapter.process(prompt, [image])
    hf = AutoProcessor.from_pretrained(tiny_deepseek)(text=prompt, images=[image], return_tensors="pt")
    assert ids == hf["input_ids"][0].tolist()
    assert ids.count(hf_config.image_token_id) == adapter.item_positions(ours)[0] == 36
    fallback = adapter.fallback_image_processor()(images=[image], return_tensors="pt")
    for name in ours:
        assert torch.equal(ours[name], hf[name]) and torch.equal(ours[name], fallback[name]), name


def test_demo_of_two_images_agrees_with_hf(tiny_deepseek, images, tmp_path):
    images[0].save(tmp_path / "a.png")
    images[1].resize((150, 100)).save(tmp_path / "b.png")
    run = cli("--demo", f"--model={tiny_deepseek}", f"--input-image={tmp_path / 'a.png'}",
              f"--input-image={tmp_path / 'b.png'}", "--mm-per-prompt=2", "--dtype=float32", "--device=cpu",
              "--output-len=12", "--reference=hf", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    agreement = json.loads(run.stdout.split("***Reference Agreement***")[1])
    assert agreement["samples_compared"] == 1 and agreement["exact_match_rate"] == 1.0, agreement


def test_acc_on_the_bundled_sample_agrees_with_hf_fp32(tiny_deepseek, tmp_path):
    run = cli("--acc", f"--model={tiny_deepseek}", "--device=cpu", "--dtype=float32", "--dataset=sample-jsonl",
              "--reference=hf", "--output-len=8", "--batch-size=3", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.split("***Acc Info***", 1)[1].split("\n}\n", 1)[0] + "\n}")
    ref = info["reference"]
    assert ref["samples_compared"] == 3 and ref["exact_match_rate"] == 1.0 and ref["max_abs_dlogprob"] < 1e-4


@pytest.mark.parametrize("name", ["deepseek-community/deepseek-vl-1.3b-chat",
                                  "deepseek-community/deepseek-vl-7b-chat"])
def test_the_bundled_configs_build_hfs_parameters_on_meta(name):
    """Every weight of HF's model (less SigLIP's unused pooling head), with its shape."""
    from transformers import AutoModelForImageTextToText

    from vllm_utils.config import load_hf_config
    from vllm_utils.engine.model_runner import build_model
    from vllm_utils.models.registry import MODEL_FAMILIES

    config = load_hf_config(name)
    ours = build_model(config, MODEL_FAMILIES[config.model_type].model, torch.device("meta"), torch.bfloat16)
    with torch.device("meta"):
        hf = AutoModelForImageTextToText.from_config(config)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in hf.parameters()), (name, count)
    assert ours.num_image_features == 576
