"""Picks the next token of each sequence: greedy, or sampled after temperature, top-k and top-p (applied in that
order, as HF's and vLLM's samplers apply them), reproducible per request when the request carries a seed."""
import torch

from vllm_utils.sampling_params import SamplingParams

# top-p looks for its cut among this many most likely tokens first, and sorts the whole vocabulary only for rows
# whose top_p these do not reach
CANDIDATES = 1024


def _top_k(scaled: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Drops the tokens below each row's k-th largest logit (ties with it stay, as in HF's warper)."""
    vocab = scaled.shape[-1]
    widest = max(limit for limit in top_k if limit < vocab)
    k = torch.tensor([min(limit, widest) for limit in top_k], device=scaled.device)
    kth = scaled.topk(widest).values.gather(-1, (k - 1)[:, None])
    unlimited = torch.tensor([limit >= vocab for limit in top_k], device=scaled.device)
    kth = kth.masked_fill(unlimited[:, None], float("-inf"))  # rows without a top-k keep everything
    return scaled.masked_fill(scaled < kth, float("-inf"))


def _top_p_cut(probs: torch.Tensor, top_p: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Among each row's n likeliest tokens: the probability of the last token of the smallest set reaching top_p,
    and whether the set ends among the n."""
    values = probs.topk(n).values if n < probs.shape[-1] else probs.sort(dim=-1, descending=True).values
    before = values.cumsum(dim=-1) - values  # the mass of the likelier tokens
    last = (before < top_p[:, None]).sum(dim=-1) - 1
    return values.gather(-1, last[:, None]), before[:, -1] + values[:, -1] >= top_p


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zeroes the tokens outside each row's smallest set of likeliest tokens reaching top_p (ties with its least
    likely token stay); rows with top_p 1 keep everything."""
    cut, fits = _top_p_cut(probs, top_p, min(CANDIDATES, probs.shape[-1]))
    fits |= top_p >= 1
    if not bool(fits.all()):
        cut = torch.where(fits[:, None], cut, _top_p_cut(probs, top_p, probs.shape[-1])[0])
    cut = cut.masked_fill((top_p >= 1)[:, None], 0.0)
    return probs.masked_fill(probs < cut, 0.0)


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """A token of each row with chance proportional to its weight: one uniform number per row, from the row's own
    generator when it has one, looked up in the row's cumulative sum (in token order: a row's draw depends on its
    weights alone, not on the rows beside it)."""
    cdf = probs.double().cumsum(dim=-1)
    # float32 numbers below 1, widened: u * total stays below total, so a token of weight 0 is never drawn
    u = torch.stack([torch.rand((), generator=g) for g in generators]).double().to(probs.device)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return picked.clamp_(max=probs.shape[-1] - 1)  # NaN logits: a valid id, not an index past the vocabulary


def distribution(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Each row's weights to draw from ([rows, vocab], fp32; proportional to the probabilities): its logits over
    its temperature, then its top-k, then its top-p."""
    temps = torch.tensor([p.temperature for p in params], device=logits.device)
    scaled = logits.float() / temps[:, None]
    vocab = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if min(top_k) < vocab:
        scaled = _top_k(scaled, top_k)
    probs = scaled.softmax(dim=-1)
    if any(p.top_p < 1 for p in params):
        probs = _top_p(probs, torch.tensor([p.top_p for p in params], device=logits.device))
    return probs


def penalize(logits: torch.Tensor, params: list[SamplingParams], histories: list[tuple[list[int], list[int]]],
             eos_token_ids: list[int]) -> torch.Tensor:
    """The logits (fp32, changed in place) after each row's penalties, in vLLM's order: the repetition penalty over
    the prompt's and the output's tokens (positive logits divided by it, negative ones multiplied, as HF's
    processor does), then the output's frequency and presence penalties (OpenAI's); and with fewer outputs than
    min_tokens, EOS and the stop tokens masked (HF's MinNewTokensLengthLogitsProcessor)."""
    for row, (p, (prompt, output)) in enumerate(zip(params, histories)):
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long, device=logits.device)
            values = logits[row, seen]
            logits[row, seen] = torch.where(values < 0, values * p.repetition_penalty, values / p.repetition_penalty)
        if output and (p.frequency_penalty or p.presence_penalty):
            counts = torch.bincount(torch.tensor(output, device=logits.device), minlength=logits.shape[-1])
            counts = counts[: logits.shape[-1]].float()
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        if len(output) < p.min_tokens:
            stops = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
            if stops:
                logits[row, torch.tensor(stops, dtype=torch.long, device=logits.device)] = float("-inf")
    return logits


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> list[dict | None]:
    """Per row that asks (`logprobs` set): {token: (log-prob, rank)} of its `logprobs` likeliest tokens and of the
    chosen one, under the model's own distribution (rank 1: the likeliest)."""
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None])
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    vocab = logits.shape[-1]
    asked = [None if p.logprobs is None else vocab if p.logprobs == -1 else min(p.logprobs, vocab) for p in params]
    widest = max((a for a in asked if a is not None), default=0)
    best_lp, best_ids = logprobs.topk(widest, dim=-1) if widest else (None, None)
    out: list[dict | None] = []
    for row, k in enumerate(asked):
        if k is None:
            out.append(None)
            continue
        entries = {}
        if k:
            ids, lps = best_ids[row, :k].tolist(), best_lp[row, :k].tolist()
            entries = {token: (lp, rank) for rank, (token, lp) in enumerate(zip(ids, lps), start=1)}
        entries[int(tokens[row])] = (float(chosen[row]), ranks[row])
        out.append(entries)
    return out


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           histories: list[tuple[list[int], list[int]]] | None = None, eos_token_ids: list[int] = (),
           greedy_tokens: torch.Tensor | None = None) -> tuple[list[int], list[dict | None] | None]:
    """logits: [seqs, vocab] (any float dtype). Returns the token ids and, where any row asks for log-probs, each
    row's (see `top_logprobs`). `histories`: each row's (prompt, output) token ids, for penalties and min_tokens.
    `greedy_tokens`: the argmax, if already computed."""
    want_logprobs = any(p.logprobs is not None for p in params)
    shaped = [i for i, p in enumerate(params) if p.penalized or (histories and len(histories[i][1]) < p.min_tokens)]
    if greedy_tokens is not None and not want_logprobs and not shaped and all(p.greedy for p in params):
        return greedy_tokens.tolist(), None  # a graph's argmax: one small copy, no work on the logits
    raw = logits.float()  # once: the reductions below are faster on fp32 than on bf16 CPU tensors
    logits = raw
    if shaped:
        rows = torch.tensor(shaped, device=raw.device)
        logits = raw.clone()
        logits[rows] = penalize(raw[rows].clone(), [params[i] for i in shaped], [histories[i] for i in shaped],
                                eos_token_ids)
        greedy_tokens = None
    tokens = greedy_tokens if greedy_tokens is not None else logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rows = torch.tensor(random_rows, device=logits.device)
        weights = distribution(logits[rows], [params[i] for i in random_rows])
        tokens = tokens.clone()
        tokens[rows] = _draw(weights, [generators[i] for i in random_rows])
    token_list = tokens.tolist()
    if not want_logprobs:
        return token_list, None
    return token_list, top_logprobs(raw, tokens, params)
