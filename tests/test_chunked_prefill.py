"""Chunked prefill: with a token budget per step below the prompt lengths, prompts are prefilled in chunks (their
queries attending to the cache of the earlier chunks), running requests' decodes share those steps, and every
token equals HF's."""
import pytest
import torch

from vllm_utils import LLM, SamplingParams
from vllm_utils.threads import system_choice

from test_matches_hf import BATCH, request

PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _record_steps(llm: LLM) -> list[list[tuple[int, int]]]:
    """Each step's (tokens still to compute, tokens computed this step) per sequence, as scheduled."""
    steps, schedule = [], llm.engine.scheduler.schedule

    def recording():
        step = schedule()
        steps.append([(len(s) - s.num_computed, n) for s, n in zip(step.seqs, step.num_tokens)])
        return step

    llm.engine.scheduler.schedule = recording
    return steps


@pytest.mark.parametrize("budget", [7, 32])
def test_chunks_and_mixed_decodes_give_hf_tokens(tiny_llava, hf_reference, images, budget):
    llm = LLM(tiny_llava, device="cpu", dtype="float32", max_model_len=512, max_num_batched_tokens=budget)
    steps = _record_steps(llm)
    reqs = [request(llm, text, [images[i] for i in idx]) for text, idx in BATCH]
    outputs = llm.generate(reqs, PARAMS, use_tqdm=False)
    for req, out, (_, idx) in zip(reqs, outputs, BATCH):
        assert out.outputs[0].token_ids == hf_reference.greedy(req, 16, ignore_eos=True)
    assert all(sum(n for _, n in step) <= budget for step in steps)
    assert any(n < remaining for step in steps for remaining, n in step)  # a prompt was cut into chunks
    assert any(remaining == 1 for step in steps for remaining, n in step if len(step) > 1
               and any(r > 1 for r, _ in step))  # a decode shared a step with a prompt's chunk


def test_chunks_under_preemption_give_hf_tokens(tiny_llava, hf_reference, images):
    llm = LLM(tiny_llava, device="cpu", dtype="float32", block_size=4, num_kv_blocks=48, max_num_seqs=4,
              max_model_len=192, max_num_batched_tokens=24)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reqs = [request(llm, text, [images[i] for i in idx]) for text, idx in BATCH]
    outputs = llm.generate(reqs, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free == 48 and not llm.engine.runner.mm_cache
    for req, out, (_, idx) in zip(reqs, outputs, BATCH):
        assert out.outputs[0].token_ids == hf_reference.greedy(req, 40, ignore_eos=True)


def test_a_sliding_window_across_chunks_gives_hf_tokens(tmp_path, images):
    from vllm_utils.testing.tiny_llava import build_tiny_llava

    from conftest import HFReference, real_tokenizer_dir

    folder = build_tiny_llava(str(tmp_path / "mistral"), real_tokenizer_dir(), seed=5, text_type="mistral",
                              text_config=dict(sliding_window=12))
    hf = HFReference(folder)
    llm = LLM(folder, device="cpu", dtype="float32", max_model_len=512, max_num_batched_tokens=10)
    req = request(llm, "Describe the picture in detail please.", images[:1])
    out = llm.generate([req], PARAMS, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf.greedy(req, 16, ignore_eos=True)


def test_prompt_logprobs_of_a_chunked_prompt_equal_the_whole_prompts(tiny_llava, images):
    results = []
    for budget in (None, 9):
        llm = LLM(tiny_llava, device="cpu", dtype="float32", max_model_len=512, max_num_batched_tokens=budget)
        req = request(llm, "Describe the picture.", images[:1])
        out = llm.generate([req], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1), use_tqdm=False)[0]
        results.append(out)
    whole, chunked = results
    assert len(chunked.prompt_logprobs) == len(chunked.prompt_token_ids) > 9 and chunked.prompt_logprobs[0] is None
    for a, b in zip(whole.prompt_logprobs[1:], chunked.prompt_logprobs[1:]):
        assert a.keys() == b.keys() and all(abs(a[k].logprob - b[k].logprob) < 1e-5 for k in a)
    assert whole.outputs[0].token_ids == chunked.outputs[0].token_ids


def test_chunked_prefill_at_tensor_parallel_2_gives_the_tokens_of_1(tiny_llava, images):
    outputs = {}
    for size in (1, 2):
        llm = LLM(tiny_llava, device="cpu", dtype="float32", max_model_len=512, max_num_batched_tokens=9,
                  tensor_parallel_size=size)
        reqs = [request(llm, text, [images[i] for i in idx]) for text, idx in BATCH]
        outputs[size] = [o.outputs[0].token_ids for o in llm.generate(reqs, PARAMS, use_tqdm=False)]
        llm.engine.shutdown()
    assert outputs[2] == outputs[1] and all(len(t) == PARAMS.max_tokens for t in outputs[2])
    assert torch.get_num_threads() == system_choice().threads  # the ranks' share of the cores is given back
