"""Engine behaviour beyond HF equality: sampling options, and batches that fail as a whole."""
import time

import pytest
import torch

from vllm_utils import LLM, SamplingParams
from vllm_utils.errors import UserError


@pytest.fixture(scope="module")
def llm(tiny_llava) -> LLM:
    return LLM(tiny_llava, device="cpu", dtype="float32", max_model_len=128)


def _request(llm: LLM, image, text: str = "Describe the picture.") -> dict:
    return {"prompt": llm.engine.processor.chat_prompt(text), "multi_modal_data": {"image": image}}


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(llm, images):
    req = _request(llm, images[0])
    def tokens(**kw):
        return llm.generate([req], SamplingParams(max_tokens=16, **kw), use_tqdm=False)[0].outputs[0].token_ids

    a, b, c = tokens(temperature=1.5, seed=1), tokens(temperature=1.5, seed=1), tokens(temperature=1.5, seed=2)
    assert a == b and a != c
    assert tokens(temperature=1.0, top_k=1, seed=3) == tokens(temperature=0)
    assert tokens(temperature=1.0, top_p=1e-6, seed=4) == tokens(temperature=0)


def test_the_cpu_thread_team_is_whole_again_when_the_requests_are_done(tiny_llava, images):
    """Torch work after ours in the same process (an HF reference) runs on every core, even if a neighbour had
    made our team shrink."""
    from vllm_utils.threads import system_choice

    torch.set_num_threads(system_choice().threads)  # an earlier test (tensor parallelism) may have lowered it
    llm = LLM(tiny_llava, device="cpu", dtype="float32", max_model_len=128)
    team = llm.engine.platform.team
    if team is None or team.full < 2:
        pytest.skip("the team follows the load only on CPU with two threads or more")
    team._resize(1)  # as a busy neighbour would, staying for the whole run
    team.retry_at = time.monotonic() + 3600
    llm.generate([_request(llm, images[0])], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert torch.get_num_threads() == team.full


def test_a_bad_prompt_fails_the_whole_batch_and_leaves_nothing_queued(llm, images):
    good = _request(llm, images[0])
    too_long = _request(llm, images[1], "word " * 200)
    with pytest.raises(UserError, match="--max-model-len 128"):
        llm.generate([good, good, too_long], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.engine.has_unfinished()
    assert len(llm.generate([good], SamplingParams(max_tokens=4), use_tqdm=False)) == 1


def test_generation_stops_at_max_model_len(llm, images):
    out = llm.generate([_request(llm, images[0])], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 128
    assert out.outputs[0].finish_reason == "length"
