"""Qwen3.5-MoE against transformers' model on a tiny random checkpoint shaped like Qwen3.5-35B-A3B's (Gated DeltaNet
and gated full-attention layers, each with 8 experts, 2 a token, and a shared expert): one image, two images, text
alone, in one batch; prompts prefilled in chunks; the experts loaded from per-expert tensors;
tensor parallelism; the CUDA code path through Triton's interpreter; the parameter count of the 35B-A3B shapes;
refusals."""
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_utils import LLM, SamplingParams
from vllm_utils.errors import UserError
from vllm_utils.models.qwen3_5_moe import Qwen3_5MoeForConditionalGeneration, SharedExpertMoeBlock
from vllm_utils.testing.tiny_qwen3_5_moe import VARIED_SEED, build_tiny_qwen3_5_moe

from conftest import HFReference, chosen_logprobs
from test_qwen3_vl_moe import greedy, prompts

TOKENS = 16


@pytest.fixture(scope="module")
def tiny_qwen3_5_moe(tmp_path_factory) -> str:
    return build_tiny_qwen3_5_moe(str(tmp_path_factory.mktemp("qwen3_5_moe")), seed=VARIED_SEED)


@pytest.fixture(scope="module")
def reference(tiny_qwen3_5_moe) -> HFReference:
    return HFReference(tiny_qwen3_5_moe)


@pytest.fixture(scope="module")
def llm(tiny_qwen3_5_moe) -> LLM:
    return LLM(tiny_qwen3_5_moe, device="cpu", dtype="float32", max_model_len=2048)


@pytest.fixture(scope="module")
def reqs(llm, images) -> list[dict]:
    return prompts(llm.engine.processor, images)


@pytest.fixture(scope="module")
def expected(reference, reqs) -> list[list[int]]:
    """HF's greedy tokens for each of `reqs`."""
    return [reference.greedy(req, TOKENS, ignore_eos=True) for req in reqs]


def test_every_layer_carries_the_experts_and_a_shared_expert(llm):
    layers = llm.engine.runner.model.language_model.layers
    assert all(isinstance(layer.mlp, SharedExpertMoeBlock) for layer in layers)
    assert [hasattr(layer, "linear_attn") for layer in layers] == [True, True, True, False]


def test_images_and_text_in_one_batch_give_hf_tokens_and_logprobs(llm, reference, reqs, expected):
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate(reqs, params, use_tqdm=False)
    for req, out, theirs in zip(reqs, outputs, expected):
        tokens = out.outputs[0].token_ids
        assert tokens == theirs
        their_logprobs = reference.token_logprobs(req, tokens)
        assert max(abs(a - b) for a, b in zip(chosen_logprobs(out.outputs[0]), their_logprobs)) < 1e-4
    assert min(len(set(t)) for t in expected) > 3, expected  # the reference does not repeat itself
    assert len({tuple(t) for t in expected}) == len(expected)  # the prompts answer differently
    manager = llm.engine.block_manager  # every state slot came back
    assert sorted(manager.free_state_slots) == list(range(manager.num_state_slots))


def test_prompts_prefilled_in_chunks_give_hf_tokens(tiny_qwen3_5_moe, reqs, expected):
    """Chunks of 16 tokens, boundaries inside the images: each chunk's rows routed on their own, the recurrent
    state carried from chunk to chunk, two prompts sharing the steps."""
    llm = LLM(tiny_qwen3_5_moe, device="cpu", dtype="float32", max_model_len=2048, max_num_batched_tokens=16)
    outputs = llm.generate(reqs[:2], SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True),
                           use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected[:2]
    assert all(len(o.prompt_token_ids) > 16 for o in outputs)


def test_tensor_parallel_2_gives_hf_tokens(tiny_qwen3_5_moe, reqs, expected):
    """Each rank's half of every expert, of the shared expert and of both attention kinds' heads; the routers and
    the shared expert's gate whole on both."""
    parallel = LLM(tiny_qwen3_5_moe, device="cpu", dtype="float32", max_model_len=2048, tensor_parallel_size=2)
    assert greedy(parallel, reqs[:1], 8) == [expected[0][:8]]
    parallel.engine.shutdown()


def test_experts_load_from_per_expert_tensors(tiny_qwen3_5_moe, reqs, expected, tmp_path):
    """The same weights, each expert's gate, up and down apart (as transformers' conversion for Qwen3.5-MoE reads
    them): HF's tokens. (Fused experts transposed, as Qwen3-VL-MoE's hub files hold them, load through the same
    `FusedMoE` code: tests/test_qwen3_vl_moe.py.)"""
    folder = shutil.copytree(tiny_qwen3_5_moe, tmp_path / "per_expert")
    tensors = load_file(folder / "model.safetensors")
    for key in [k for k in tensors if re.search(r"experts\.(gate_up|down)_proj$", k)]:
        fused = tensors.pop(key)
        prefix = key.rsplit(".", 1)[0]
        for e, expert in enumerate(fused):
            if key.endswith("gate_up_proj"):
                gate, up = expert.chunk(2)
                tensors[f"{prefix}.{e}.gate_proj.weight"], tensors[f"{prefix}.{e}.up_proj.weight"] = gate, up
            else:
                tensors[f"{prefix}.{e}.down_proj.weight"] = expert.clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    other = LLM(str(folder), device="cpu", dtype="float32", max_model_len=2048)
    assert greedy(other, reqs[2:], 8) == [expected[2][:8]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="interprets the CUDA path on CPUs")
def test_the_cuda_code_path_gives_hf_tokens(tiny_qwen3_5_moe, reqs, expected, monkeypatch):
    """The kernels the CUDA platform chooses (the experts and the delta rule's decode step on Triton, Triton's
    fused layers and paged attention), interpreted on CPU tensors; linear-attention models run without graphs."""
    pytest.importorskip("triton")
    from vllm_utils.kernels import triton_delta_rule, triton_moe
    from vllm_utils.platforms.cuda import CudaPlatform

    calls = {"moe": 0, "delta": 0}
    moe, step = triton_moe.fused_moe, triton_delta_rule.recurrent_step_

    def count(name, f):
        def counted(*args):
            calls[name] += 1
            return f(*args)
        return counted

    monkeypatch.setattr(triton_moe, "fused_moe", count("moe", moe))
    monkeypatch.setattr(triton_delta_rule, "recurrent_step_", count("delta", step))
    llm = LLM(tiny_qwen3_5_moe, device="cpu", dtype="float32", max_model_len=2048)
    llm.engine.runner.choose_kernels(CudaPlatform())
    assert greedy(llm, reqs[2:], 6) == [expected[2][:6]]
    assert calls["moe"] and calls["delta"], calls


def test_the_35b_a3b_shapes_build_every_transformers_parameter_on_meta():
    """Qwen3.5-35B-A3B's published shapes (256 experts, 8 a token, a shared expert, 40 layers, 3 linear to 1
    full): as many parameters as transformers' model of them holds."""
    from transformers import Qwen3_5MoeConfig
    from transformers import Qwen3_5MoeForConditionalGeneration as HFQwen3_5Moe

    from vllm_utils.engine.model_runner import build_model

    text = dict(hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                vocab_size=248320, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                shared_expert_intermediate_size=512, linear_num_key_heads=16, linear_num_value_heads=32,
                linear_key_head_dim=128, linear_value_head_dim=128, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                 "mrope_section": [11, 11, 10], "mrope_interleaved": True})
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048)
    config = Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    ours = build_model(config, Qwen3_5MoeForConditionalGeneration, torch.device("meta"), torch.bfloat16)
    with torch.device("meta"):
        theirs = HFQwen3_5Moe(config)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) and abs(count - 35.1e9) < 0.05e9, count


@pytest.mark.parametrize("field, value, message", [
    ("mlp_only_layers", [1], "text_config.mlp_only_layers = [1]"),
    ("decoder_sparse_step", 2, "text_config.decoder_sparse_step = 2"),
    ("norm_topk_prob", False, "text_config.norm_topk_prob = False"),
    ("attn_output_gate", False, "text_config.attn_output_gate = False"),
    ("n_shared_experts", 2, "text_config.n_shared_experts = 2"),
    ("num_experts_per_tok", 9, "text_config.num_experts_per_tok = 9"),
    ("shared_expert_intermediate_size", 0, "text_config.shared_expert_intermediate_size = 0"),
    ("layer_types", ["linear_attention"] * 4, "at least one full_attention layer"),
    ("hidden_act", "swish", "text_config.hidden_act 'swish'"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e7, "factor": 2.0},
     "text_config.rope_parameters.rope_type = 'yarn'"),
    ("model_type", "qwen3_5_text", "text_config.model_type 'qwen3_5_text'"),
])
def test_config_values_not_implemented_are_refused_by_name(tiny_qwen3_5_moe, field, value, message):
    from vllm_utils.config import load_hf_config

    config = load_hf_config(tiny_qwen3_5_moe)
    vars(config.text_config)[field] = value  # around the strict dataclass's checks, as a config file could
    with pytest.raises(UserError, match=re.escape(message)):
        Qwen3_5MoeForConditionalGeneration.check_config(config)
