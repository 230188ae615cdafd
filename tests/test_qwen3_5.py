"""Qwen3.5 against transformers' model on a tiny random checkpoint of its layout (Gated DeltaNet layers with a
recurrent state per sequence, then a gated full-attention layer): images, two per prompt, videos, text alone, in one
batch; prompts prefilled in chunks (the state carried from chunk to chunk); preemption (the state recomputed); bf16;
tensor parallelism; the CLI; the state slots handed out and taken back."""
import json
import re

import numpy as np
import pytest
import torch

from vllm_utils import LLM, SamplingParams
from vllm_utils.errors import UserError
from vllm_utils.models.qwen3_5 import Qwen3_5ForConditionalGeneration
from vllm_utils.testing.tiny_qwen3_5 import VARIED_SEED, build_tiny_qwen3_5

from conftest import HFReference, assert_bf16_close, chosen_logprobs
from test_cli import cli
from test_qwen3_vl import prompts

TOKENS = 16


@pytest.fixture(scope="module")
def tiny_qwen3_5(tmp_path_factory) -> str:
    return build_tiny_qwen3_5(str(tmp_path_factory.mktemp("qwen3_5")), seed=VARIED_SEED)


@pytest.fixture(scope="module")
def reference(tiny_qwen3_5) -> HFReference:
    return HFReference(tiny_qwen3_5)


@pytest.fixture(scope="module")
def llm(tiny_qwen3_5) -> LLM:
    return LLM(tiny_qwen3_5, device="cpu", dtype="float32", max_model_len=2048)


@pytest.fixture(scope="module")
def clip(images) -> np.ndarray:
    big = np.asarray(images[1].resize((200, 150)))
    return np.stack([big[i * 6 : i * 6 + 90, i * 10 : i * 10 + 120] for i in range(6)])


@pytest.fixture(scope="module")
def expected(reference, llm, images, clip) -> list[list[int]]:
    """HF's greedy tokens for each of `prompts`."""
    return [reference.greedy(req, TOKENS, ignore_eos=True) for req in prompts(llm.engine.processor, images, clip)]


def test_images_videos_and_text_in_one_batch_give_hf_tokens_and_logprobs(llm, reference, images, clip, expected):
    reqs = prompts(llm.engine.processor, images, clip)
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate(reqs, params, use_tqdm=False)
    for req, out, theirs in zip(reqs, outputs, expected):
        tokens = out.outputs[0].token_ids
        assert tokens == theirs
        their_logprobs = reference.token_logprobs(req, tokens)
        assert max(abs(a - b) for a, b in zip(chosen_logprobs(out.outputs[0]), their_logprobs)) < 1e-4
    assert min(len(set(t)) for t in expected) > 3, expected  # the reference does not repeat itself
    assert len({tuple(t) for t in expected}) == len(expected)
    manager = llm.engine.block_manager  # every state slot came back
    assert sorted(manager.free_state_slots) == list(range(manager.num_state_slots))


def test_prompts_prefilled_in_chunks_carry_their_state_and_give_hf_tokens(tiny_qwen3_5, images, clip, expected):
    """Chunks of 16 tokens (boundaries inside images, inside a video, in text), two prompts sharing the steps."""
    llm = LLM(tiny_qwen3_5, device="cpu", dtype="float32", max_model_len=2048, max_num_batched_tokens=16)
    reqs = prompts(llm.engine.processor, images, clip)
    outputs = llm.generate([reqs[i] for i in (1, 3, 4)], SamplingParams(temperature=0, max_tokens=TOKENS,
                                                                         ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [expected[i] for i in (1, 3, 4)]
    assert all(len(o.prompt_token_ids) > 16 for o in outputs)


def test_preempted_requests_recompute_their_state(tiny_qwen3_5, images, clip, expected):
    """A pool with room for every prompt but not for all of them to grow: running requests are preempted, and
    their state is rebuilt from their tokens."""
    probe = LLM(tiny_qwen3_5, device="cpu", dtype="float32", max_model_len=2048)
    reqs = prompts(probe.engine.processor, images, clip)
    lengths = [len(o.prompt_token_ids) for o in probe.generate(reqs, SamplingParams(max_tokens=1), use_tqdm=False)]
    blocks = sum(-(-n // 16) for n in lengths) + 1
    llm = LLM(tiny_qwen3_5, device="cpu", dtype="float32", max_model_len=max(lengths) + TOKENS, num_kv_blocks=blocks,
              block_size=16)
    outputs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_bf16_logprobs_close_to_hf_fp32(tiny_qwen3_5, reference, images, clip):
    llm = LLM(tiny_qwen3_5, device="cpu", dtype="bfloat16", max_model_len=2048)
    req = prompts(llm.engine.processor, images, clip)[3]
    out = llm.generate([req], SamplingParams(temperature=0, max_tokens=8, logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert_bf16_close(chosen_logprobs(out), tiny_qwen3_5, req, out.token_ids, reference)


def test_tensor_parallel_2_gives_the_tokens_of_1(tiny_qwen3_5, llm, images, clip, expected):
    """Each rank's share of the linear-attention heads (their convolution channels, decays and states) and of
    the full attention's."""
    reqs = prompts(llm.engine.processor, images, clip)[3:5]
    parallel = LLM(tiny_qwen3_5, device="cpu", dtype="float32", max_model_len=2048, tensor_parallel_size=2)
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in parallel.generate(reqs, params, use_tqdm=False)] == expected[3:5]
    parallel.engine.shutdown()


@pytest.mark.parametrize("path,value,message", [
    ("text_config.layer_types", ["linear_attention"] * 4, "at least one full_attention layer"),
    ("text_config.layer_types", ["sliding_attention"] * 4, "text_config.layer_types"),
    ("text_config.rope_parameters", {"rope_type": "yarn", "rope_theta": 1e7, "factor": 2.0},
     "text_config.rope_parameters.rope_type = 'yarn'"),
    ("text_config.attention_bias", True, "text_config.attention_bias = True"),
    ("text_config.attn_output_gate", False, "text_config.attn_output_gate = False"),
    ("text_config.mamba_ssm_dtype", "bfloat16", "text_config.mamba_ssm_dtype = 'bfloat16'"),
    ("text_config.model_type", "qwen3_vl_text", "text_config.model_type 'qwen3_vl_text'"),
])
def test_config_values_not_implemented_are_refused_by_name(tiny_qwen3_5, path, value, message):
    from vllm_utils.config import load_hf_config

    config = load_hf_config(tiny_qwen3_5)
    *parents, field = path.split(".")
    target = config
    for name in parents:
        target = getattr(target, name)
    setattr(target, field, value)
    with pytest.raises(UserError, match=re.escape(message)):
        Qwen3_5ForConditionalGeneration.check_config(config)


def test_demo_gives_hf_tokens(tiny_qwen3_5, tmp_path, images):
    images[0].save(tmp_path / "a.png")
    run = cli("--demo", f"--model={tiny_qwen3_5}", f"--input-image={tmp_path / 'a.png'}", "--dtype=float32",
              "--device=cpu", "--output-len=12", "--reference=hf", "--prompt=describe the picture", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    agreement = json.loads(run.stdout.split("***Reference Agreement***")[1])
    assert agreement["samples_compared"] == 1 and agreement["exact_match_rate"] == 1.0, agreement
    assert agreement["max_abs_dlogprob"] < 1e-4


def test_acc_on_the_bundled_sample_agrees_with_hf_fp32(tiny_qwen3_5, tmp_path):
    run = cli("--acc", f"--model={tiny_qwen3_5}", "--device=cpu", "--dtype=float32", "--dataset=sample-jsonl",
              "--reference=hf", "--output-len=8", "--batch-size=3", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.split("***Acc Info***", 1)[1].split("\n}\n", 1)[0] + "\n}")
    ref = info["reference"]
    assert ref["samples_compared"] == 3 and ref["exact_match_rate"] == 1.0 and ref["max_abs_dlogprob"] < 1e-4


def test_perf_reports_the_recurrent_state(tiny_qwen3_5, tmp_path):
    run = cli("--perf", f"--model={tiny_qwen3_5}", "--device=cpu", "--dtype=float32", "--input-len=96",
              "--output-len=4", "--num-prompts=2", "--batch-size=2", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    # per sequence slot (2): 3 linear layers x (a 4-tap window of 2*2*16 + 4*16 channels, 3 of them kept, in
    # float32, and 4 heads x 16 x 16 float32)
    state = 2 * 3 * ((2 * 2 * 16 + 4 * 16) * 3 * 4 + 4 * 16 * 16 * 4)
    assert f"recurrent state: {state / 2**20:.1f} MiB" in run.stdout, run.stdout


def test_the_cuda_code_path_gives_hf_tokens(tiny_qwen3_5, llm, images, clip, expected, monkeypatch):
    """The kernels the CUDA platform chooses (the delta rule's decode step on Triton, Triton's fused layers and
    paged attention), interpreted on CPU tensors."""
    pytest.importorskip("triton")
    from vllm_utils.kernels import triton_delta_rule
    from vllm_utils.platforms.cuda import CudaPlatform

    if torch.cuda.is_available():
        pytest.skip("interprets the CUDA path on CPUs")
    calls = []
    step = triton_delta_rule.recurrent_step_
    monkeypatch.setattr(triton_delta_rule, "recurrent_step_", lambda *args: calls.append(1) or step(*args))
    other = LLM(tiny_qwen3_5, device="cpu", dtype="float32", max_model_len=2048)
    other.engine.runner.choose_kernels(CudaPlatform())
    req = prompts(other.engine.processor, images, clip)[0]
    out = other.generate([req], SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == expected[0]
    assert calls


def test_a_budget_too_small_for_every_state_runs_fewer_requests_at_once(tiny_qwen3_5, images, clip, expected,
                                                                         monkeypatch, capsys):
    """--batch-size 8 where half the cache budget holds the states of 2: two requests run at a time, and all
    give HF's tokens."""
    from types import SimpleNamespace

    from vllm_utils.engine import kv_cache, model_runner

    class Budget:  # a platform whose cache budget is one sequence's KV and four states
        def kv_cache_budget(self, device, config, one_sequence):
            return one_sequence + 3 * per_sequence

    per_sequence = 1000
    config = SimpleNamespace(max_model_len=64, max_num_seqs=8, dtype=torch.float32,
                             engine=SimpleNamespace(block_size=16))
    layers = [SimpleNamespace(num_kv_heads=1, head_dim=8)]
    one_kv = 5 * 2 * 8 * 4 * 16
    assert kv_cache.plan_state_slots(config, Budget(), "cpu", layers, per_sequence) == (one_kv + 4000) // 2 // 1000
    assert kv_cache.plan_state_slots(config, Budget(), "cpu", layers, 0) == 0
    assert "at most" in capsys.readouterr().err

    monkeypatch.setattr(model_runner, "plan_state_slots", lambda *args: 2)
    llm = LLM(tiny_qwen3_5, device="cpu", dtype="float32", max_model_len=2048, max_num_seqs=8)
    reqs = prompts(llm.engine.processor, images, clip)
    outputs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.engine.block_manager.num_state_slots == 2 and len(llm.engine.block_manager.free_state_slots) == 2
