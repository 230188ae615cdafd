"""Rotary position embedding (rotate-half layout, as Llama in transformers), with the rope types
that Llama checkpoints use: default, linear, llama3 and dynamic (NTK, InternVL3's: it changes nothing within
max_position_embeddings, which --max-model-len never exceeds); and Qwen2-VL's multimodal RoPE, whose positions have three
rows (time, height, width), each rotating its own section of the frequencies."""
import math

import torch
from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.layers.op import Op

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


def rope_parameters(config: PretrainedConfig) -> dict:
    """The rope settings in transformers 5 form, also from older configs (rope_theta + rope_scaling)."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    scaling.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return scaling


def inverse_frequencies(head_dim: int, params: dict) -> torch.Tensor:
    base = float(params.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = params.get("rope_type", "default")
    if rope_type in ("default", "dynamic"):  # transformers rescales dynamic RoPE past max_position_embeddings only
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        factor, low, high = float(params["factor"]), params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise UserError(f"rope_type '{rope_type}' is not supported yet (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(Op):
    def __init__(self, head_dim: int, max_positions: int, params: dict) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, params)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim]. Returns the rotated pair (an
        implementation may rotate in place and return its inputs)."""
        return self.run(positions, q, k)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row index of each token, cos table, sin table): what every implementation reads, token t rotated by
        cos[index[t]] and sin[index[t]]."""
        return positions, self.cos, self.sin

    def forward_native(self, positions: torch.Tensor, q: torch.Tensor,
                       k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index, cos_table, sin_table = self.tables(positions)
        cos = cos_table[index].to(q.dtype).unsqueeze(1)
        sin = sin_table[index].to(q.dtype).unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal RoPE: positions [3, tokens] (time, height, width); frequency j of the first half of the head
    takes its angle from the row of the section it falls in (`sections`, summing to head_dim / 2), and the second
    half repeats the first. Positions [tokens] (decode: the three rows agree) are plain RoPE."""

    def __init__(self, head_dim: int, max_positions: int, params: dict, sections: list[int]) -> None:
        super().__init__(head_dim, max_positions, params)
        if sum(sections) != head_dim // 2:
            raise UserError(f"rope mrope_section {sections} must sum to head_dim / 2 ({head_dim // 2})")
        rows = [i % 3 for i, size in enumerate(sections) for _ in range(size)]
        self.register_buffer("freq_rows", torch.tensor(rows + rows), persistent=False)
        self._last: tuple[torch.Tensor, tuple] | None = None  # every layer of a step rotates by the same positions

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For [3, tokens] positions: a table of one row per token, gathered once per step."""
        if positions.dim() == 1:
            return positions, self.cos, self.sin
        if self._last is not None and self._last[0] is positions:
            return self._last[1]
        per_freq = positions[self.freq_rows]  # [head_dim, tokens]: each frequency's position row
        columns = torch.arange(per_freq.shape[0], device=positions.device)[:, None]
        cos, sin = self.cos[per_freq, columns].T.contiguous(), self.sin[per_freq, columns].T.contiguous()
        tables = (torch.arange(positions.shape[1], device=positions.device), cos, sin)
        self._last = (positions, tables)
        return tables
