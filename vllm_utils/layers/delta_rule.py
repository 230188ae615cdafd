"""The gated delta rule of linear attention (Gated DeltaNet: Qwen3.5, Qwen3-Next), on one recurrent state per
sequence, S [value heads, key dim, value dim] in float32. Per token t, with q and k L2-normalised (q also scaled by
key dim ** -0.5):

    S = S * exp(g_t);  S = S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t

A prompt runs it chunk by chunk (the within-chunk part as matrices, one triangular solve, as transformers'
`torch_chunk_gated_delta_rule`), a decode step token by token for a batch of sequences. Key heads serve
value heads // key heads consecutive value heads each."""
import torch
import torch.nn.functional as F

from vllm_utils.layers.op import Op

CHUNK = 64


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _heads_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor):
    """[tokens, heads, dim] -> [value heads, tokens, dim] float32, q and k normalised and repeated per value head."""
    group = v.shape[-2] // k.shape[-2]
    q, k = (x.repeat_interleave(group, dim=-2) for x in (q, k))
    q, k, v, g, beta = (x.transpose(0, 1).float() for x in (q, k, v, g, beta))
    return l2norm(q) * q.shape[-1] ** -0.5, l2norm(k), v, g, beta


def chunked_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                       state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's tokens: q, k [tokens, key heads, key dim], v [tokens, value heads, value dim], g (log decay)
    and beta [tokens, value heads], state [value heads, key dim, value dim] float32. Returns (the outputs [tokens,
    value heads, value dim] in v's dtype, the state after the last token)."""
    tokens, dtype = q.shape[0], v.dtype
    q, k, v, g, beta = _heads_first(q, k, v, g, beta)
    pad = -tokens % CHUNK
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    heads, chunks = v.shape[0], (tokens + pad) // CHUNK
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    q, k, k_beta, v_beta = (x.view(heads, chunks, CHUNK, -1) for x in (q, k, k_beta, v_beta))
    g = g.view(heads, chunks, CHUNK).cumsum(-1)  # log of the decay from the chunk's start to each token
    later = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).triu(1)
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(later, float("-inf")).exp()  # token j to token i
    system = (k_beta @ k.transpose(-1, -2)) * decay  # unit lower-triangular: the chunk's updates at once
    within = (q @ k.transpose(-1, -2)) * decay
    new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    decayed_keys = torch.linalg.solve_triangular(system, k_beta * g.exp()[..., None], upper=False,
                                                 unitriangular=True)
    q = q * g.exp()[..., None]
    k = k * (g[..., -1:] - g).exp()[..., None]
    chunk_decay = g[..., -1].exp()[..., None, None]
    out = torch.empty_like(new_values)
    for i in range(chunks):
        corrected = new_values[:, i] - decayed_keys[:, i] @ state
        out[:, i] = q[:, i] @ state + within[:, i] @ corrected
        state = state * chunk_decay[:, i] + k[:, i].transpose(-1, -2) @ corrected
    return out.reshape(heads, -1, out.shape[-1])[:, :tokens].transpose(0, 1).to(dtype), state


def recurrent_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of each of a batch of sequences: q, k [seqs, key heads, key dim], v [seqs, value heads, value
    dim], g and beta [seqs, value heads], state [seqs, value heads, key dim, value dim] float32. Returns (outputs
    [seqs, value heads, value dim] in v's dtype, the new states)."""
    dtype = v.dtype
    q, k, v, g, beta = (x.transpose(0, 1) for x in _heads_first(q, k, v, g, beta))  # back to sequences first
    state = state * g.exp()[..., None, None]
    remembered = torch.einsum("shkv,shk->shv", state, k)
    delta = (v - remembered) * beta[..., None]
    state = state + k[..., :, None] * delta[..., None, :]
    return torch.einsum("shkv,shk->shv", state, q).to(dtype), state


class GatedDeltaRule(Op):
    """The rule over a step's sequences, reading and writing their states in place (a device may replace it)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                states: torch.Tensor, slots: torch.Tensor, seq_lens: list[int] | None) -> torch.Tensor:
        """q, k, v, g, beta of every token of the step; `states` [slots, value heads, key dim, value dim] the
        layer's pool, `slots` [seqs] each sequence's; `seq_lens` the tokens of each (a prefill), None for one
        token each (a decode). Returns [tokens, value heads, value dim]."""
        return self.run(q, k, v, g, beta, states, slots, seq_lens)

    def forward_native(self, q, k, v, g, beta, states, slots, seq_lens) -> torch.Tensor:
        if seq_lens is None:
            out, states[slots] = recurrent_delta_rule(q, k, v, g, beta, states[slots])
            return out
        outs, start = [], 0
        for slot, n in zip(slots.tolist(), seq_lens):
            s = slice(start, start + n)
            out, states[slot] = chunked_delta_rule(q[s], k[s], v[s], g[s], beta[s], states[slot])
            outs.append(out)
            start += n
        return torch.cat(outs)
