"""The sampler against HF's logits warpers (temperature, then top-k, then top-p): the same distribution, drawn
with the right frequencies, reproducible per seed."""
import pytest
import torch
from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from vllm_utils.layers.sampler import CANDIDATES, distribution, penalize, sample
from vllm_utils.sampling_params import SamplingParams


def hf_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    rows = []
    for row, p in zip(logits.float(), params):
        scores = TemperatureLogitsWarper(p.temperature)(None, row[None])
        if p.top_k > 0:
            scores = TopKLogitsWarper(p.top_k)(None, scores)
        if p.top_p < 1:
            scores = TopPLogitsWarper(p.top_p)(None, scores)
        rows.append(scores.softmax(dim=-1)[0])
    return torch.stack(rows)


def our_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    weights = distribution(logits, params)
    return weights / weights.sum(dim=-1, keepdim=True)


MIXES = {
    "temperature only": [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3)],
    "top-k": [SamplingParams(top_k=5), SamplingParams(temperature=0.5, top_k=40)],
    "top-p": [SamplingParams(top_p=0.9), SamplingParams(temperature=2.0, top_p=0.5)],
    "top-k then top-p": [SamplingParams(top_k=30, top_p=0.6), SamplingParams(temperature=0.8, top_k=3, top_p=0.95)],
    "rows with and without limits": [SamplingParams(), SamplingParams(top_k=7), SamplingParams(top_p=0.8)],
    "top-k beyond the candidates": [SamplingParams(top_k=CANDIDATES + 500, top_p=0.9), SamplingParams(top_p=0.7)],
    "top-k beyond the vocabulary": [SamplingParams(top_k=10**6), SamplingParams(top_k=10**6, top_p=0.9)],
}


@pytest.mark.parametrize("spread", [8.0, 0.1], ids=["peaked", "flat"])  # top-p within the candidates, and beyond
@pytest.mark.parametrize("mix", MIXES.keys())
def test_the_distribution_is_hfs(mix, spread):
    params = MIXES[mix]
    logits = torch.randn(len(params), 4 * CANDIDATES, generator=torch.Generator().manual_seed(0)) * spread
    torch.testing.assert_close(our_probs(logits, params), hf_probs(logits, params), atol=1e-6, rtol=1e-4)


def test_ties_stay_together():
    """Top-k keeps the tokens tied with the k-th, as HF does. Top-p keeps every token tied with the least likely
    it needs, where HF keeps those its sort happened to put first."""
    params = MIXES["rows with and without limits"]  # all, top-k 7, top-p 0.8
    logits = (torch.randn(len(params), 500, generator=torch.Generator().manual_seed(3)) * 2).round()  # many ties
    ours, hf = our_probs(logits, params), hf_probs(logits, params)
    torch.testing.assert_close(ours[:2], hf[:2], atol=1e-6, rtol=1e-4)
    kept, hf_kept = ours[2] > 0, hf[2] > 0
    assert bool((kept >= hf_kept).all())
    assert set(logits[2][kept & ~hf_kept].tolist()) <= {logits[2][hf_kept].min().item()}


def test_draws_follow_the_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    params = [SamplingParams(temperature=0.7, top_k=4, top_p=0.7)] * len(logits)
    tokens, _ = sample(logits, params, [None] * len(logits))
    counts = torch.bincount(torch.tensor(tokens), minlength=logits.shape[-1]).double() / len(tokens)
    expected = hf_probs(logits[:1], params[:1])[0].double()
    assert counts[expected == 0].sum() == 0  # no token the warpers drop is ever drawn
    torch.testing.assert_close(counts, expected, atol=0.015, rtol=0)


def test_seeded_rows_reproduce_whatever_shares_their_batch():
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(top_k=20, seed=2), SamplingParams(temperature=0)]

    def draws(rows: list[int], steps: int = 20) -> list[list[int]]:
        generators = [None if params[r].seed is None else torch.Generator().manual_seed(params[r].seed) for r in rows]
        return [sample(logits[rows], [params[r] for r in rows], generators)[0] for _ in range(steps)]

    together = draws([0, 1, 2])
    assert together == draws([0, 1, 2])
    assert [t[0] for t in together] == [t[0] for t in draws([0])]  # row 0 alone draws what it drew in the batch
    assert len({t[0] for t in together}) > 1  # it does sample


def test_logprobs_are_the_unmodified_distributions():
    """vLLM's logprobs=k: per row the k likeliest tokens and the chosen one, with their ranks, under the model's own
    distribution (before temperature, top-k, top-p)."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(2)).bfloat16()
    params = [SamplingParams(temperature=0, logprobs=0), SamplingParams(temperature=0.5, top_k=3, logprobs=5),
              SamplingParams(top_p=0.5, logprobs=2), SamplingParams(temperature=0)]
    tokens, logprobs = sample(logits, params, [None] * 4)
    full = logits.float().log_softmax(dim=-1)
    assert tokens[0] == int(logits[0].argmax()) and logprobs[3] is None
    for row, (p, entries) in enumerate(zip(params[:3], logprobs)):
        top = full[row].topk(p.logprobs).indices.tolist()
        assert set(entries) == {tokens[row], *top}
        for token, (lp, rank) in entries.items():
            assert lp == pytest.approx(float(full[row, token]), abs=1e-6)
            assert rank == 1 + int((full[row] > full[row, token]).sum())



def test_the_repetition_penalty_is_hfs_over_prompt_and_output():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 50, generator=gen) * 3
    logits[0, 3], logits[0, 7], logits[1, 1], logits[1, 2] = -2.0, 1.5, -0.5, 2.5  # seen tokens of either sign
    histories = [([3, 7, 7, 11], [20, 3]), ([1, 2], [])]
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(repetition_penalty=0.7)]
    ours = penalize(logits.clone(), params, histories, eos_token_ids=[])
    for row, (p, (prompt, output)) in enumerate(zip(params, histories)):
        ids = torch.tensor([prompt + output])
        expected = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, logits[row : row + 1].clone())[0]
        torch.testing.assert_close(ours[row], expected)


def test_frequency_and_presence_penalties_are_openais_over_the_output():
    """logit - frequency * count - presence * (count > 0), counting the output's tokens only (not the prompt's)."""
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(5))
    prompt, output = [4, 4, 9], [9, 9, 2, 9, 17]
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.3)
    ours = penalize(logits.clone(), [p], [(prompt, output)], eos_token_ids=[])[0]
    counts = torch.bincount(torch.tensor(output), minlength=30).float()
    torch.testing.assert_close(ours, logits[0] - 0.5 * counts - 0.3 * (counts > 0).float())
    assert ours[4] == logits[0, 4]  # a prompt token the output does not hold keeps its logit


def test_min_tokens_holds_back_eos_and_the_stop_tokens_as_hf_does():
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(6))
    logits[0, 2] = logits[0, 5] = 10.0  # EOS (2) and a stop token (5) are the likeliest
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[5])
    for output in ([], [7, 8]):
        prompt = [1, 9]
        ours = penalize(logits.clone(), [p], [(prompt, output)], eos_token_ids=[2])[0]
        hf = MinNewTokensLengthLogitsProcessor(len(prompt), 3, [2, 5])(torch.tensor([prompt + output]),
                                                                       logits.clone())[0]
        torch.testing.assert_close(ours, hf)
        tokens, _ = sample(logits, [p], [None], [(prompt, output)], eos_token_ids=[2])
        assert tokens[0] not in (2, 5)
    tokens, _ = sample(logits, [p], [None], [([1, 9], [7, 8, 6])], eos_token_ids=[2])
    assert tokens[0] in (2, 5)  # three tokens out: they may end it
