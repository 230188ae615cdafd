"""Gemma 3 against transformers' model on a tiny random checkpoint shaped like google/gemma-3-4b-it: one image, two
of different sizes, text alone, in one batch (local layers whose window is shorter than every prompt, an image's
positions attending to each other both ways); pan and scan on a wide image; chunked prefill where a chunk boundary
would fall inside an image; preemption; the processor's tokens and pixels; config values refused by name; the CLI;
the bundled configurations."""
import json
import re

import pytest
import torch

from vllm_utils import LLM, SamplingParams
from vllm_utils.errors import UserError
from vllm_utils.models.gemma3 import Gemma3ForConditionalGeneration
from vllm_utils.testing.tiny_gemma3 import MM_TOKENS_PER_IMAGE, SLIDING_WINDOW, VARIED_SEED, build_tiny_gemma3

from conftest import HFReference, assert_bf16_close, chosen_logprobs, uncaptured_graph_mode
from test_cli import cli, error_lines

TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0)
PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 32}  # crops of the tiny pictures


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory) -> str:
    """The published checkpoints' key layout (transformers 4.5x)."""
    return build_tiny_gemma3(str(tmp_path_factory.mktemp("gemma3")), seed=VARIED_SEED)


@pytest.fixture(scope="module")
def reference(tiny_gemma3) -> HFReference:
    return HFReference(tiny_gemma3)


@pytest.fixture(scope="module")
def llm(tiny_gemma3) -> LLM:
    return LLM(tiny_gemma3, device="cpu", dtype="float32", max_model_len=1024)


def prompts(adapter, images) -> list[dict]:
    """One image, two images of different sizes, text alone."""
    cases = [("describe the picture", [images[0]]),
             ("compare the two pictures", [images[0], images[1].resize((100, 180))]),
             ("the dog runs across the green field next to a cup of coffee on a wooden table", [])]
    return [{"prompt": adapter.chat_prompt(text, len(ims)), "multi_modal_data": {"image": ims}} for text, ims in cases]


def assert_hfs(outputs, reqs, reference: HFReference, logprobs: bool = True) -> None:
    """HF's greedy tokens (which vary: no one token repeated), and log-probs within 1e-4 of HF's, for each
    request."""
    for req, out in zip(reqs, outputs):
        ours = out.outputs[0]
        assert ours.token_ids == reference.greedy(req, TOKENS, ignore_eos=True)
        assert len(set(ours.token_ids)) > 3, ours.token_ids
        if logprobs:
            theirs = reference.token_logprobs(req, ours.token_ids)
            assert max(abs(a - b) for a, b in zip(chosen_logprobs(ours), theirs)) < 1e-4


def test_images_and_text_in_one_batch_give_hf_tokens_and_logprobs(llm, reference, images):
    reqs = prompts(llm.engine.processor, images)
    outputs = llm.generate(reqs, GREEDY, use_tqdm=False)
    assert min(len(o.prompt_token_ids) for o in outputs) > SLIDING_WINDOW  # the local layers slide
    assert_hfs(outputs, reqs, reference)
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) == len(outputs)  # the prompts answer differently


def test_pan_and_scan_crops_a_wide_image_as_hf_does(tiny_gemma3, images):
    """A wide picture cut into crops (each framed as an image) beside a square one left whole, in one batch;
    mm_processor_kwargs reach HF's processor for our engine and for HF alike."""
    from vllm_utils.config import EngineConfig
    from vllm_utils.engine.resolve import resolve

    llm = LLM(tiny_gemma3, device="cpu", dtype="float32", max_model_len=1024, mm_processor_kwargs=PAN_AND_SCAN)
    adapter = llm.engine.processor
    reqs = [{"prompt": adapter.chat_prompt(text, 1), "multi_modal_data": {"image": [image]}}
            for text, image in (("describe the picture", images[1].resize((240, 80))),
                                ("what is in this image ?", images[0].resize((90, 90))))]
    outputs = llm.generate(reqs, GREEDY, use_tqdm=False)
    reference = HFReference(resolve(EngineConfig(tiny_gemma3, dtype="float32", mm_processor_kwargs=PAN_AND_SCAN)))
    hf_ids = reference.inputs(reqs[0])["input_ids"][0].tolist()
    assert outputs[0].prompt_token_ids == hf_ids
    assert hf_ids.count(adapter.mm_token_id) == 4 * MM_TOKENS_PER_IMAGE  # the image and its three crops
    assert outputs[1].prompt_token_ids.count(adapter.mm_token_id) == MM_TOKENS_PER_IMAGE  # square: no crops
    assert_hfs(outputs, reqs, reference)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_chunked_prefill_never_splits_an_image(tiny_gemma3, reference, images, backend):
    """Chunks of 20 tokens: the first boundary would fall inside the first image, whose positions must be computed
    in one chunk to see each other; later chunks read the image's keys from the cache. With the device's backend
    and the pure-PyTorch one."""
    llm = LLM(tiny_gemma3, device="cpu", dtype="float32", max_model_len=1024, max_num_batched_tokens=20,
              attention_backend=backend)
    reqs = prompts(llm.engine.processor, images)[:2]
    outputs = llm.generate(reqs, GREEDY, use_tqdm=False)
    ids = outputs[1].prompt_token_ids
    first = ids.index(llm.engine.processor.mm_token_id)
    assert first < 20 < first + MM_TOKENS_PER_IMAGE and len(ids) > 40
    assert_hfs(outputs, reqs, reference, logprobs=False)


def test_preemption_recomputes_the_same_tokens(tiny_gemma3, reference, images):
    """96 cache slots for three requests of 30 to 60 prompt tokens and 24 more each: running requests are
    preempted, and recomputed with their images' positions bidirectional again."""
    llm = LLM(tiny_gemma3, device="cpu", dtype="float32", block_size=4, num_kv_blocks=24, max_num_seqs=3,
              max_model_len=96)
    reqs = prompts(llm.engine.processor, images)
    outputs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free == 24  # every block came back
    for req, out in zip(reqs, outputs):
        assert out.outputs[0].token_ids == reference.greedy(req, 24, ignore_eos=True)


def test_the_cuda_path_through_tritons_interpreter_gives_hf_tokens(tiny_gemma3, reference, images):
    """The kernels the CUDA platform chooses (Triton RoPE + K/V store and paged decode; prefill as the PyTorch
    backend, with the image's positions bidirectional) and graph mode's padded steps, through Triton's interpreter
    on CPU where there is no GPU."""
    pytest.importorskip("triton")
    from vllm_utils.attention.triton_backend import TritonPagedAttention
    from vllm_utils.platforms.cuda import CudaPlatform

    llm = LLM(tiny_gemma3, device="cpu", dtype="float32", max_model_len=256)
    llm.engine.runner.choose_kernels(CudaPlatform())
    assert isinstance(llm.engine.runner.backend, TritonPagedAttention)
    uncaptured_graph_mode(llm)
    req = prompts(llm.engine.processor, images)[0]
    out = llm.generate(req, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == reference.greedy(req, 4, ignore_eos=True)


def test_bf16_logprobs_close_to_hf_fp32(tiny_gemma3, reference, images):
    llm = LLM(tiny_gemma3, device="cpu", dtype="bfloat16", max_model_len=1024)
    req = prompts(llm.engine.processor, images)[1]
    out = llm.generate(req, GREEDY, use_tqdm=False)[0].outputs[0]
    assert_bf16_close(chosen_logprobs(out), tiny_gemma3, req, out.token_ids, reference)


def test_tensor_parallel_2_gives_the_tokens_of_1(tiny_gemma3, llm, images):
    """Each rank's share of the heads and MLPs (the q/k norms per head, the projector whole on every rank)."""
    reqs = prompts(llm.engine.processor, images)[1:2]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    single = [o.outputs[0].token_ids for o in llm.generate(reqs, params, use_tqdm=False)]
    parallel = LLM(tiny_gemma3, device="cpu", dtype="float32", max_model_len=1024, tensor_parallel_size=2)
    assert [o.outputs[0].token_ids for o in parallel.generate(reqs, params, use_tqdm=False)] == single
    parallel.engine.shutdown()


def test_transformers_5_key_layout_loads_the_same_weights(llm, tmp_path, images):
    """transformers 5's own layout (model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*)."""
    saved = build_tiny_gemma3(str(tmp_path / "saved"), seed=VARIED_SEED, layout="saved")
    req = prompts(llm.engine.processor, images)[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    other = LLM(saved, device="cpu", dtype="float32", max_model_len=256)
    assert other.generate(req, params, use_tqdm=False)[0].outputs[0].token_ids == \
        llm.generate(req, params, use_tqdm=False)[0].outputs[0].token_ids


# ---- the processor ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes, settings", [
    ([(64, 64)], {}), ([(20, 300)], {}), ([(500, 375), (30, 50)], {}),
    ([(240, 80)], PAN_AND_SCAN), ([(50, 400), (64, 64)], PAN_AND_SCAN),
    ([(1000, 300)], {"do_pan_and_scan": True}),  # the processor's defaults: crops of at least 256 pixels
    ([(300, 200)], {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 16, "pan_and_scan_max_num_crops": 2,
                    "pan_and_scan_min_ratio_to_activate": 1.4}),  # ratio 1.5: two crops
])
def test_tokens_and_pixels_equal_gemma3_processors(tiny_gemma3, images, sizes, settings):
    """Our tokens, pixels and token types are Gemma3Processor's; the adapter's own expansion (where transformers
    cannot build the processor) and the image processor built from the config alone give the same."""
    from vllm_utils.multimodal.gemma3 import Gemma3ProcessorAdapter
    from vllm_utils.config import load_hf_config

    adapter = Gemma3ProcessorAdapter(tiny_gemma3, load_hf_config(tiny_gemma3), processor_kwargs=settings)
    pictures = [images[i % 2].resize(size) for i, size in enumerate(sizes)]
    prompt = adapter.chat_prompt("describe", len(pictures))
    ids, mm = adapter.process(prompt, pictures)
    hf = adapter.hf_processor(text=prompt, images=pictures, return_tensors="pt", **settings)
    assert ids == hf["input_ids"][0].tolist() and torch.equal(mm["pixel_values"], hf["pixel_values"])
    assert torch.equal(adapter.hf_token_inputs(hf["input_ids"])["token_type_ids"], hf["token_type_ids"])
    assert sum(adapter.item_positions(mm)) == ids.count(adapter.mm_token_id)
    assert ("num_crops" in mm) == bool(settings) and len(adapter.item_positions(mm)) == len(pictures)
    own_ids, own = adapter._expand(prompt, pictures)
    assert own_ids == ids and own.keys() == mm.keys() and all(torch.equal(own[k], mm[k]) for k in mm)
    fallback = adapter.fallback_image_processor()(images=pictures, return_tensors="pt", **adapter.pan_and_scan())
    assert torch.equal(fallback["pixel_values"], mm["pixel_values"])


def test_a_chat_gives_the_tokens_of_hfs_apply_chat_template(llm, images):
    """One <bos>, as HF's apply_chat_template(tokenize=True) gives (the template writes it, the tokenizer would add
    another), through LLM.chat and the rendered prompt alike."""
    adapter = llm.engine.processor
    image = images[0].resize((90, 60))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "describe"}]}]
    hf = adapter.hf_processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                  return_dict=True, return_tensors="pt")
    ids, mm = adapter.process(adapter.chat_prompt("describe", 1), [image])
    assert ids == hf["input_ids"][0].tolist() and ids[0] == adapter.bos_token_id != ids[1]
    assert torch.equal(mm["pixel_values"], hf["pixel_values"])
    chat = [{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                         {"type": "text", "text": "describe"}]}]
    out = llm.chat(chat, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert out.prompt_token_ids == ids


def test_processor_settings_are_checked_by_name(tiny_gemma3):
    from vllm_utils.config import load_hf_config
    from vllm_utils.multimodal.gemma3 import Gemma3ProcessorAdapter

    config = load_hf_config(tiny_gemma3)
    for settings, words in (({"pan_and_scan": True}, "'pan_and_scan' is not a setting of gemma3's processor here "
                                                     "(it takes: do_pan_and_scan, pan_and_scan_min_crop_size"),
                            ({"do_pan_and_scan": 1}, "it takes true or false"),
                            ({"pan_and_scan_max_num_crops": 0}, "it takes a whole number >= 1"),
                            ({"pan_and_scan_min_ratio_to_activate": "2"}, "it takes a number >= 1")):
        with pytest.raises(UserError, match=re.escape(words)):
            Gemma3ProcessorAdapter(tiny_gemma3, config, processor_kwargs=settings)


# ---- the configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize("path, value, message", [
    ("text_config.final_logit_softcapping", 30.0, "text_config.final_logit_softcapping = 30.0"),
    ("text_config.attn_logit_softcapping", 50.0, "text_config.attn_logit_softcapping = 50.0"),
    ("text_config.use_bidirectional_attention", True, "text_config.use_bidirectional_attention"),
    ("text_config.layer_types", ["chunked_attention"] * 4, "text_config.layer_types = 'chunked_attention'"),
    ("text_config.rope_parameters.full_attention", {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6},
     "text_config.rope_parameters.full_attention.rope_type = 'yarn'"),
    ("text_config.hidden_activation", "swish", "text_config.hidden_activation 'swish'"),
    ("text_config.sliding_window", None, "text_config.sliding_window = None"),
    ("text_config.model_type", "gemma2", "text_config.model_type 'gemma2'"),
    ("mm_tokens_per_image", 8, "mm_tokens_per_image 8 is not supported"),
    ("vision_config.model_type", "clip_vision_model", "vision_config.model_type 'clip_vision_model'"),
])
def test_config_values_not_implemented_are_refused_by_name(tiny_gemma3, path, value, message):
    from vllm_utils.config import load_hf_config

    config = load_hf_config(tiny_gemma3)
    *parents, field = path.split(".")
    target = config
    for name in parents:
        target = target[name] if isinstance(target, dict) else getattr(target, name)
    if isinstance(target, dict):
        target[field] = value
    else:
        setattr(target, field, value)
    with pytest.raises(UserError, match=re.escape(message)):
        Gemma3ForConditionalGeneration.check_config(config)


def test_the_layer_types_follow_sliding_window_pattern_where_none_are_given(tiny_gemma3):
    from vllm_utils.config import load_hf_config
    from vllm_utils.models.gemma3_text import layer_types

    text = load_hf_config(tiny_gemma3).text_config
    text.layer_types, text.sliding_window_pattern, text.num_hidden_layers = None, 2, 4
    assert layer_types(text) == ["sliding_attention", "full_attention"] * 2


def test_paligemma_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "paligemma",
                                                      "architectures": ["PaliGemmaForConditionalGeneration"]}))
    run = cli("--perf", f"--model={tmp_path}", "--load-format=dummy", "--device=cpu", "--input-len=64",
              "--output-len=2")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    [line] = error_lines(run)
    assert "'paligemma' model" in line and "PaliGemma is not supported" in line and "soft-capping" in line


@pytest.mark.parametrize("name, billions", [("google/gemma-3-4b-it", 4.30), ("google/gemma-3-27b-it", 27.43)])
def test_the_bundled_configs_build_every_transformers_parameter_on_meta(name, billions):
    from transformers import AutoModelForImageTextToText

    from vllm_utils.config import load_hf_config
    from vllm_utils.engine.model_runner import build_model

    config = load_hf_config(name)
    ours = build_model(config, Gemma3ForConditionalGeneration, torch.device("meta"), torch.bfloat16)
    with torch.device("meta"):
        theirs = AutoModelForImageTextToText.from_config(config)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) and abs(count - billions * 1e9) < 0.01e9
    assert ours.language_model.layers[5].self_attn.attn.sliding_window is None  # every sixth layer global
    assert ours.language_model.layers[0].self_attn.attn.sliding_window == 1024


# ---- the command line ------------------------------------------------------------------------------
def test_demo_gives_hf_tokens(tiny_gemma3, tmp_path, images):
    images[0].save(tmp_path / "a.png")
    images[1].resize((150, 100)).save(tmp_path / "b.png")
    run = cli("--demo", f"--model={tiny_gemma3}", f"--input-image={tmp_path / 'a.png'}",
              f"--input-image={tmp_path / 'b.png'}", "--mm-per-prompt=2", "--dtype=float32", "--device=cpu",
              "--output-len=12", "--reference=hf", "--prompt=describe the picture", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    agreement = json.loads(run.stdout.split("***Reference Agreement***")[1])
    assert agreement["samples_compared"] == 1 and agreement["exact_match_rate"] == 1.0, agreement
    assert agreement["max_abs_dlogprob"] < 1e-4


def test_acc_on_the_bundled_sample_agrees_with_hf_fp32(tiny_gemma3, tmp_path):
    run = cli("--acc", f"--model={tiny_gemma3}", "--device=cpu", "--dtype=float32", "--dataset=sample-jsonl",
              "--reference=hf", "--output-len=8", "--batch-size=3", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.split("***Acc Info***", 1)[1].split("\n}\n", 1)[0] + "\n}")
    ref = info["reference"]
    assert ref["samples_compared"] == 3 and ref["exact_match_rate"] == 1.0 and ref["max_abs_dlogprob"] < 1e-4
