"""Picks the next token of each sequence: greedy, or temperature / top-k / top-p sampling,
reproducible per request when the request carries a seed."""
import torch

from vllm_utils.sampling_params import SamplingParams


def _mask_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    drop = ranks[None, :] >= top_k[:, None]
    probs = sorted_logits.softmax(dim=-1)
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]  # keep the smallest set reaching top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           want_logprobs: bool, greedy_tokens: torch.Tensor | None = None) -> tuple[list[int], list[float] | None]:
    """logits: [seqs, vocab] (any float dtype). Returns token ids and, if asked, their log-probs
    under the model's unmodified distribution. `greedy_tokens`: the argmax, if already computed."""
    if greedy_tokens is not None and not want_logprobs and all(p.greedy for p in params):
        return greedy_tokens.tolist(), None  # the common case: one small copy, no work on the logits
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rows = torch.tensor(random_rows, device=logits.device)
        chosen = [params[i] for i in random_rows]
        temps = torch.tensor([p.temperature for p in chosen], device=logits.device)
        top_k = torch.tensor([p.top_k if p.top_k > 0 else logits.shape[-1] for p in chosen], device=logits.device)
        top_p = torch.tensor([p.top_p for p in chosen], device=logits.device)
        scaled = _mask_top_k_top_p(logits[rows] / temps[:, None], top_k, top_p)
        probs = scaled.softmax(dim=-1)
        # Sampling by the exponential race (argmax of p / E, E ~ Exp(1)): one noise draw per row,
        # from the request's own generator when it has a seed.
        noise = torch.empty_like(probs)
        for j, i in enumerate(random_rows):
            if generators[i] is not None:
                noise[j] = torch.empty(probs.shape[-1]).exponential_(generator=generators[i]).to(noise.device)
            else:
                noise[j].exponential_()
        tokens[rows] = (probs / noise).argmax(dim=-1)
    token_list = tokens.tolist()
    if not want_logprobs:
        return token_list, None
    logprobs = logits.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return token_list, logprobs.tolist()
