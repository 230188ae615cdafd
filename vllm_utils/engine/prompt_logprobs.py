"""Prompt log-probs (vLLM's `prompt_logprobs`): the prefill keeps every row of the prompts that ask for them,
instead of only each prompt's last row, and each row's distribution scores the token that follows it."""
import torch

CHUNK_ROWS = 256  # rows turned into float log-probs at once: bounds the extra memory for long prompts


def kept_rows(seq_lens: list[int], all_rows: list[bool]) -> tuple[torch.Tensor, list[int], list[int]]:
    """The packed rows a prefill keeps: every row of the prompts in `all_rows`, the last of the others. Returns
    them, where each prompt's last row sits among them, and where each prompt's rows start among them."""
    keep, last, first = [], [], []
    start = 0
    for n, every in zip(seq_lens, all_rows or [False] * len(seq_lens)):
        first.append(len(keep))
        keep.extend(range(start, start + n) if every else [start + n - 1])
        last.append(len(keep) - 1)
        start += n
    return torch.tensor(keep), last, first


def prompt_logprobs(logits: torch.Tensor, token_ids: list[int], top: int) -> list[dict[int, float] | None]:
    """`logits`: [len(token_ids), vocab], row i predicting token i + 1. Entry i (i >= 1): {token i: its log-prob}
    plus the `top` most likely tokens there; entry 0 is None (nothing precedes the first token)."""
    out: list[dict[int, float] | None] = [None]
    targets = torch.tensor(token_ids[1:], device=logits.device)
    for lo in range(0, len(token_ids) - 1, CHUNK_ROWS):
        rows = logits[lo : lo + CHUNK_ROWS][: len(targets) - lo].float().log_softmax(dim=-1)
        given = rows.gather(-1, targets[lo : lo + len(rows), None]).squeeze(-1).tolist()
        best_lp, best_ids = rows.topk(top, dim=-1) if top else (rows[:, :0], rows[:, :0].long())
        for token, lp, ids, lps in zip(targets[lo : lo + len(rows)].tolist(), given, best_ids.tolist(),
                                       best_lp.tolist()):
            out.append({**dict(zip(ids, lps)), token: lp})
    return out
