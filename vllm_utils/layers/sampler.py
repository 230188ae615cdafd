"""Picks the next token of each sequence: greedy, or sampled after temperature, top-k and top-p (applied in that
order, as HF's and vLLM's samplers apply them), reproducible per request when the request carries a seed."""
import torch

from vllm_utils.sampling_params import SamplingParams

# top-p looks first among this many most likely tokens; it sorts the whole vocabulary only for rows whose
# top_p these do not reach
CANDIDATES = 1024


def _top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Among each row's n most likely tokens: (probabilities after top-k and top-p, 0 where dropped; their token
    ids; whether the row's kept tokens all lie among the n). Without a top-k the probabilities are normalized
    over the whole row, with one over its top-k."""
    if n < scaled.shape[-1]:
        values, ids = scaled.topk(n)
    else:
        values, ids = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(n, device=scaled.device)
    values = values.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    has_top_k = top_k < scaled.shape[-1]
    norm = torch.where(has_top_k, values.logsumexp(dim=-1), scaled.logsumexp(dim=-1))
    probs = (values - norm[:, None]).exp()
    mass = probs.cumsum(dim=-1)
    probs = probs.masked_fill(mass - probs >= top_p[:, None], 0.0)  # keep the smallest set reaching top_p
    fits = (top_k <= n) | (~has_top_k & (top_p < 1) & (mass[:, -1] >= top_p))
    return probs, ids, fits


def _allowed(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's probabilities to sample from ([rows, n], unnormalized) and the token id of each column (None:
    the column is the token id)."""
    vocab = scaled.shape[-1]
    if bool((top_k >= vocab).all() and (top_p >= 1).all()):
        return scaled.softmax(dim=-1), None  # temperature only: no order needed
    n = int(top_k.max())
    if n > CANDIDATES and bool((top_p < 1).any()):
        probs, ids, fits = _top_k_top_p(scaled, top_k, top_p, CANDIDATES)
        if bool(fits.all()):
            return probs, ids
    probs, ids, _ = _top_k_top_p(scaled, top_k, top_p, n)
    return probs, ids


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """A column of each row with chance proportional to its entry: one uniform number per row, from the row's own
    generator when it has one, looked up in the row's cumulative sum."""
    cdf = probs.double().cumsum(dim=-1)
    # float32 numbers below 1, widened: u * total stays below total, so a column of weight 0 is never drawn
    u = torch.stack([torch.rand((), generator=g) for g in generators]).double().to(probs.device)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           want_logprobs: bool, greedy_tokens: torch.Tensor | None = None) -> tuple[list[int], list[float] | None]:
    """logits: [seqs, vocab] (any float dtype). Returns token ids and, if asked, their log-probs
    under the model's unmodified distribution. `greedy_tokens`: the argmax, if already computed."""
    tokens = greedy_tokens if greedy_tokens is not None else logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        tokens = tokens.clone()
        rows = torch.tensor(random_rows, device=logits.device)
        chosen = [params[i] for i in random_rows]
        vocab = logits.shape[-1]
        temps = torch.tensor([p.temperature for p in chosen], device=logits.device)
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in chosen], device=logits.device)
        top_p = torch.tensor([p.top_p for p in chosen], device=logits.device)
        probs, ids = _allowed(logits[rows].float() / temps[:, None], top_k, top_p)
        picked = _draw(probs, [generators[i] for i in random_rows])
        tokens[rows] = picked if ids is None else ids.gather(-1, picked[:, None]).squeeze(-1)
    token_list = tokens.tolist()
    if not want_logprobs:
        return token_list, None
    logits = logits.float()
    logprobs = logits.gather(-1, tokens[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)
    return token_list, logprobs.tolist()
