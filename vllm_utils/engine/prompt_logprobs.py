"""Prompt log-probs (vLLM's `prompt_logprobs`): a prefill keeps every row of the prompts that ask for them, not
only each prompt's last row, and each row's distribution scores the token that follows it. A prompt prefilled in
chunks gets its entries chunk by chunk."""
import torch

CHUNK_ROWS = 256  # rows turned into float log-probs at once: bounds the extra memory for long prompts


def kept_rows(seq_lens: list[int], all_rows: list[bool], samples: list[bool]) -> tuple[list[int], list[int],
                                                                                       list[int]]:
    """The packed rows a prefill keeps: every row of the sequences in `all_rows`, the last row of the others that
    sample. Returns them, where each sampling sequence's last row sits among them, and where each sequence's
    rows start among them."""
    keep, last, first = [], [], []
    start = 0
    for n, every, sampled in zip(seq_lens, all_rows or [False] * len(seq_lens), samples):
        first.append(len(keep))
        keep.extend(range(start, start + n) if every else [start + n - 1] if sampled else [])
        if sampled:
            last.append(len(keep) - 1)
        start += n
    return keep, last, first


def prompt_logprobs(logits: torch.Tensor, targets: list[int], top: int) -> list[dict[int, tuple[float, int]]]:
    """`logits`: one row per target, the row before it. Entry i: {token: (log-prob, rank)} of targets[i] and of the
    `top` most likely tokens there (rank 1: the likeliest)."""
    out = []
    target = torch.tensor(targets, device=logits.device)
    for lo in range(0, len(targets), CHUNK_ROWS):
        rows = logits[lo : lo + CHUNK_ROWS].float().log_softmax(dim=-1)
        given = rows.gather(-1, target[lo : lo + len(rows), None])
        ranks = ((rows > given).sum(dim=-1) + 1).tolist()
        k = rows.shape[-1] if top == -1 else min(top, rows.shape[-1])  # -1: the whole vocabulary
        best_lp, best_ids = rows.topk(k, dim=-1) if k else (rows[:, :0], rows[:, :0].long())
        for token, lp, rank, ids, lps in zip(targets[lo : lo + len(rows)], given.squeeze(-1).tolist(), ranks,
                                             best_ids.tolist(), best_lp.tolist()):
            out.append({**{i: (v, r) for r, (i, v) in enumerate(zip(ids, lps), start=1)}, token: (lp, rank)})
    return out
