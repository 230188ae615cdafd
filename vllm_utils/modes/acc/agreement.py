"""Does this device compute the same model as a reference? The same prompts through HF transformers (fp32 on CPU
by default), compared with our engine's outputs:

- exact match: our greedy tokens equal the reference's greedy tokens; first divergence: the first position
  where they differ;
- teacher-forced on the reference's tokens (each fed after the prompt, one prefill): top-1 agreement, the share
  of positions where our most likely next token is the reference's token, and |Δ log-prob|, how far our
  log-probability of each reference token is from the reference's own (mean and max over tokens).

Greedy texts can part on near-ties in 16-bit arithmetic while the model is right; the teacher-forced figures
still show a device that computes another model."""
from dataclasses import asdict, dataclass

from vllm_utils.hf_reference import HFReference
from vllm_utils.progress import progress_bar
from vllm_utils.sampling_params import SamplingParams


@dataclass
class Agreement:
    """One sample's figures (None where the reference or the teacher-forced pass failed: see `error`)."""

    exact_match: bool | None = None
    first_divergence: int | None = None  # token position; None when the outputs are identical
    num_reference_tokens: int = 0
    top1_agreement: float | None = None
    mean_abs_dlogprob: float | None = None
    max_abs_dlogprob: float | None = None
    error: str | None = None


def first_divergence(ours: list[int], ref: list[int]) -> int | None:
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            return i
    return None if len(ours) == len(ref) else min(len(ours), len(ref))


def compare(ours: list[int], ref: list[int], ref_logprobs: list[float],
            forced: list[dict[int, float]]) -> Agreement:
    """`forced[j]`: our {token: log-prob} at reference position j (the reference's token and our top one)."""
    top1 = [max(d, key=d.get) == t for d, t in zip(forced, ref)]
    delta = [abs(d[t] - lp) for d, t, lp in zip(forced, ref, ref_logprobs)]
    divergence = first_divergence(ours, ref)
    return Agreement(divergence is None, divergence, len(ref), sum(top1) / len(top1), sum(delta) / len(delta),
                     max(delta))


def teacher_forced(llm, request: dict, ref_tokens: list[int]) -> list[dict[int, float]]:
    """Our log-probs at each of the reference's positions: one prefill of the prompt followed by its tokens;
    {token: log-prob} of the reference's token and our likeliest there."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    out = llm.generate([{**request, "continuation_token_ids": ref_tokens}], params, use_tqdm=False)[0]
    return [{t: e.logprob for t, e in d.items()} for d in out.prompt_logprobs[len(request["prompt_token_ids"]):]]


def agreement(llm, reference: HFReference, requests: list[dict], ours: list[list[int]], max_tokens: int | list[int],
              use_tqdm: bool = True) -> list[Agreement]:
    """The figures above for each request (processed: token ids and tensors) and our greedy tokens for it, each
    generated up to `max_tokens` (one for all, or one per request). `llm`: anything with `LLM.generate`'s
    signature that runs our engine."""
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(ours)
    results = []
    with progress_bar(total=len(ours), desc="HF reference", unit="sample", disable=not use_tqdm) as bar:
        for request, our_tokens, limit in zip(requests, ours, limits):
            results.append(_one(llm, reference, request, our_tokens, limit))
            bar.update(1)
    return results


def _one(llm, reference: HFReference, request: dict, our_tokens: list[int], max_tokens: int) -> Agreement:
    try:
        ref_tokens, ref_logprobs = reference.greedy_with_logprobs(request, max_tokens)
        forced = teacher_forced(llm, request, ref_tokens)
    except Exception as e:  # one sample's failure is reported, and the others still compared
        return Agreement(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    return compare(our_tokens, ref_tokens, ref_logprobs, forced)


def overall(results: list[Agreement]) -> dict[str, object]:
    """Exact-match rate over samples; top-1 agreement and mean |Δ log-prob| over all reference tokens; the max
    |Δ log-prob| and the earliest divergence over samples."""
    ok = [r for r in results if r.error is None]
    tokens = sum(r.num_reference_tokens for r in ok)
    divergences = [r.first_divergence for r in ok if r.first_divergence is not None]
    return {
        "samples_compared": len(ok), "samples_failed": len(results) - len(ok), "reference_tokens": tokens,
        "exact_match_rate": sum(r.exact_match for r in ok) / len(ok) if ok else None,
        "samples_diverged": len(divergences),
        "earliest_divergence": min(divergences) if divergences else None,
        "top1_agreement": sum(r.top1_agreement * r.num_reference_tokens for r in ok) / tokens if tokens else None,
        "mean_abs_dlogprob": sum(r.mean_abs_dlogprob * r.num_reference_tokens for r in ok) / tokens if tokens else None,
        "max_abs_dlogprob": max((r.max_abs_dlogprob for r in ok), default=None),
    }


def as_record(result: Agreement) -> dict:
    return asdict(result)
