"""Qwen3-VL-MoE against transformers' model on a tiny random checkpoint shaped like Qwen3-VL-30B-A3B-Instruct's
(8 experts, 2 a token, one dense layer): one image, two images, text alone, in one batch; prompts prefilled in
chunks; requests preempted and recomputed; bf16; the experts loaded from per-expert and hub-transposed tensors;
tensor parallelism; the parameter count of the 30B-A3B shapes; refusals; the CLI."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_utils import LLM, SamplingParams
from vllm_utils.errors import UserError
from vllm_utils.layers.moe import SparseMoeBlock
from vllm_utils.models.llama import LlamaMLP
from vllm_utils.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration
from vllm_utils.testing.tiny_qwen3_vl_moe import VARIED_SEED, build_tiny_qwen3_vl_moe

from conftest import HFReference, assert_bf16_close, chosen_logprobs, uncaptured_graph_mode
from test_cli import cli

TOKENS = 24  # past EOS too: both sides ignore it, neither masks it


@pytest.fixture(scope="module")
def tiny_qwen3_vl_moe(tmp_path_factory) -> str:
    return build_tiny_qwen3_vl_moe(str(tmp_path_factory.mktemp("qwen3_vl_moe")), seed=VARIED_SEED)


@pytest.fixture(scope="module")
def reference(tiny_qwen3_vl_moe) -> HFReference:
    return HFReference(tiny_qwen3_vl_moe)


@pytest.fixture(scope="module")
def llm(tiny_qwen3_vl_moe) -> LLM:
    return LLM(tiny_qwen3_vl_moe, device="cpu", dtype="float32", max_model_len=2048)


def prompts(adapter, images) -> list[dict]:
    """One image, two images of different sizes, text alone."""
    cases = [("describe the picture", [images[0]]),
             ("what is in this image ?", [images[0], images[1].resize((100, 180))]),
             ("a cup of coffee on a wooden table", [])]
    return [{"prompt": adapter.chat_prompt(text, len(ims)), "multi_modal_data": {"image": ims}} for text, ims in cases]


def greedy(llm: LLM, reqs: list[dict], tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(reqs, params, use_tqdm=False)]


def test_experts_sit_where_the_config_says(llm):
    """mlp_only_layers [1]: layers 0 and 2 carry the experts, layer 1 the dense MLP, as transformers builds them."""
    kinds = [type(layer.mlp) for layer in llm.engine.runner.model.language_model.layers]
    assert kinds == [SparseMoeBlock, LlamaMLP, SparseMoeBlock]


def test_images_and_text_in_one_batch_give_hf_tokens_and_logprobs(llm, reference, images):
    reqs = prompts(llm.engine.processor, images)
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate(reqs, params, use_tqdm=False)
    variety = []
    for req, out in zip(reqs, outputs):
        tokens = out.outputs[0].token_ids
        assert tokens == reference.greedy(req, TOKENS, ignore_eos=True)
        theirs = reference.token_logprobs(req, tokens)
        assert max(abs(a - b) for a, b in zip(chosen_logprobs(out.outputs[0]), theirs)) < 1e-4
        variety.append(len(set(tokens)))
    assert min(variety) > 3, variety  # the reference does not repeat itself
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) == len(outputs)  # the prompts answer differently


def test_prompts_prefilled_in_chunks_give_hf_tokens(tiny_qwen3_vl_moe, reference, images):
    """Chunks of 16 tokens, boundaries inside the images: each chunk's rows routed on their own."""
    llm = LLM(tiny_qwen3_vl_moe, device="cpu", dtype="float32", max_model_len=2048, max_num_batched_tokens=16)
    reqs = prompts(llm.engine.processor, images)[:2]
    for req, tokens in zip(reqs, greedy(llm, reqs, 12)):
        assert tokens == reference.greedy(req, 12, ignore_eos=True)


def test_preempted_requests_recompute_hf_tokens(tiny_qwen3_vl_moe, reference, images):
    """192 cache slots for three requests of 46-120 tokens: running requests are preempted; recomputed, each token
    is routed to the same experts again."""
    llm = LLM(tiny_qwen3_vl_moe, device="cpu", dtype="float32", block_size=4, num_kv_blocks=48, max_num_seqs=4,
              max_model_len=192)
    reqs = prompts(llm.engine.processor, images)
    for req, tokens in zip(reqs, greedy(llm, reqs, TOKENS)):
        assert tokens == reference.greedy(req, TOKENS, ignore_eos=True)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free == 48  # every block came back


def test_bf16_logprobs_close_to_hf_fp32(tiny_qwen3_vl_moe, reference, images):
    llm = LLM(tiny_qwen3_vl_moe, device="cpu", dtype="bfloat16", max_model_len=2048)
    req = prompts(llm.engine.processor, images)[1]
    out = llm.generate([req], SamplingParams(temperature=0, max_tokens=12, logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert_bf16_close(chosen_logprobs(out), tiny_qwen3_vl_moe, req, out.token_ids, reference)


@pytest.mark.parametrize("layout", ["per_expert", "hub_transposed"])
def test_experts_load_from_per_expert_and_transposed_tensors(tiny_qwen3_vl_moe, llm, images, tmp_path, layout):
    """The same weights, each expert's gate, up and down apart (Qwen3-MoE's layout), or fused with each expert
    transposed (the hub's Qwen3-VL-MoE files): the same tokens."""
    folder = shutil.copytree(tiny_qwen3_vl_moe, tmp_path / layout)
    tensors = load_file(folder / "model.safetensors")
    for key in [k for k in tensors if re.search(r"experts\.(gate_up|down)_proj$", k)]:
        fused = tensors.pop(key)
        if layout == "hub_transposed":
            tensors[key] = fused.transpose(1, 2).contiguous()
            continue
        prefix = key.rsplit(".", 1)[0]
        for e, expert in enumerate(fused):
            if key.endswith("gate_up_proj"):
                gate, up = expert.chunk(2)
                tensors[f"{prefix}.{e}.gate_proj.weight"], tensors[f"{prefix}.{e}.up_proj.weight"] = gate, up
            else:
                tensors[f"{prefix}.{e}.down_proj.weight"] = expert.clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    reqs = prompts(llm.engine.processor, images)[:1]
    other = LLM(str(folder), device="cpu", dtype="float32", max_model_len=2048)
    assert greedy(other, reqs, 8) == greedy(llm, reqs, 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interprets the CUDA path on CPUs")
def test_the_cuda_code_path_gives_hf_greedy_tokens(tiny_qwen3_vl_moe, reference, images, monkeypatch):
    """The kernels the CUDA platform chooses (the experts on Triton at decode, natively for the prompt; Triton's
    fused layers and paged attention; padded graph steps), interpreted on CPU and without capture."""
    pytest.importorskip("triton")
    from vllm_utils.kernels import triton_moe
    from vllm_utils.platforms.cuda import CudaPlatform

    calls = []
    monkeypatch.setattr(triton_moe, "fused_moe", lambda *args, f=triton_moe.fused_moe: calls.append(1) or f(*args))
    llm = LLM(tiny_qwen3_vl_moe, device="cpu", dtype="float32", max_model_len=2048)
    llm.engine.runner.choose_kernels(CudaPlatform())
    uncaptured_graph_mode(llm)
    req = prompts(llm.engine.processor, images)[0]
    assert greedy(llm, [req], 12)[0] == reference.greedy(req, 12, ignore_eos=True)
    assert calls


def test_tensor_parallel_2_gives_the_tokens_of_1(tiny_qwen3_vl_moe, llm, images):
    """Each rank's half of every expert, the router whole on both."""
    reqs = prompts(llm.engine.processor, images)[:1]
    single = greedy(llm, reqs, 8)
    parallel = LLM(tiny_qwen3_vl_moe, device="cpu", dtype="float32", max_model_len=2048, tensor_parallel_size=2)
    assert greedy(parallel, reqs, 8) == single
    parallel.engine.shutdown()


def test_the_30b_a3b_shapes_build_every_transformers_parameter_on_meta():
    """Qwen3-VL-30B-A3B-Instruct's published shapes (128 experts, 8 a token, 48 layers): as many parameters as
    transformers' model of them holds."""
    from transformers import Qwen3VLMoeConfig
    from transformers import Qwen3VLMoeForConditionalGeneration as HFQwen3VLMoe

    from vllm_utils.engine.model_runner import build_model

    text = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                head_dim=128, vocab_size=151936, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True})
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048,
                  deepstack_visual_indexes=[8, 16, 24])
    config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    ours = build_model(config, Qwen3VLMoeForConditionalGeneration, torch.device("meta"), torch.bfloat16)
    with torch.device("meta"):
        theirs = HFQwen3VLMoe(config)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) and abs(count - 31.07e9) < 0.05e9, count


@pytest.mark.parametrize("field, value, message", [
    ("norm_topk_prob", False, "text_config.norm_topk_prob = False"),
    ("shared_expert_intermediate_size", 64, "text_config.shared_expert_intermediate_size = 64"),
    ("num_experts_per_tok", 9, "text_config.num_experts_per_tok = 9"),
    ("hidden_act", "swish", "text_config.hidden_act 'swish'"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0}, "text_config.rope_parameters.rope_type = 'linear'"),
])
def test_config_values_not_implemented_are_refused_by_name(tiny_qwen3_vl_moe, field, value, message):
    from vllm_utils.config import load_hf_config

    config = load_hf_config(tiny_qwen3_vl_moe)
    vars(config.text_config)[field] = value  # around the strict dataclass's checks, as a config file could
    with pytest.raises(UserError, match=re.escape(message)):
        Qwen3VLMoeForConditionalGeneration.check_config(config)


def test_demo_gives_hf_tokens(tiny_qwen3_vl_moe, tmp_path, images):
    images[0].save(tmp_path / "a.png")
    images[1].resize((150, 100)).save(tmp_path / "b.png")
    run = cli("--demo", f"--model={tiny_qwen3_vl_moe}", f"--input-image={tmp_path / 'a.png'}",
              f"--input-image={tmp_path / 'b.png'}", "--mm-per-prompt=2", "--dtype=float32", "--device=cpu",
              "--output-len=12", "--reference=hf", "--prompt=describe the picture", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    agreement = json.loads(run.stdout.split("***Reference Agreement***")[1])
    assert agreement["samples_compared"] == 1 and agreement["exact_match_rate"] == 1.0, agreement
    assert agreement["max_abs_dlogprob"] < 1e-4


def test_acc_on_the_bundled_sample_agrees_with_hf_fp32(tiny_qwen3_vl_moe, tmp_path):
    run = cli("--acc", f"--model={tiny_qwen3_vl_moe}", "--device=cpu", "--dtype=float32", "--dataset=sample-jsonl",
              "--reference=hf", "--output-len=8", "--batch-size=3", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.split("***Acc Info***", 1)[1].split("\n}\n", 1)[0] + "\n}")
    ref = info["reference"]
    assert ref["samples_compared"] == 3 and ref["exact_match_rate"] == 1.0 and ref["max_abs_dlogprob"] < 1e-4
