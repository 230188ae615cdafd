"""The vision transformer of Qwen2-VL and Qwen2.5-VL, read top to bottom. Pixels arrive as rows of flattened
14x14 patches (two frames deep: an image is its frame twice), each item's patches ordered so that every 2x2 block
the merger joins is four consecutive rows. Attention is bidirectional within each frame of each item, rotated by
2-D RoPE on the patch's (row, column). Qwen2.5-VL attends within windows of the frame except in its full-attention
blocks, and uses RMSNorm and a gated MLP; Qwen2-VL uses LayerNorm and a plain MLP."""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.attention.encoder import EncoderAttention
from vllm_utils.errors import UserError
from vllm_utils.layers.activation import ActAndMul, Activation, check_activation
from vllm_utils.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, \
    RowParallelLinear
from vllm_utils.layers.norm import RMSNorm
from vllm_utils.layers.rotary import rotate_half


def check_vision_config(vision: PretrainedConfig) -> None:
    """Refuses, by name, vision settings the tower does not implement."""
    check_activation(vision.hidden_act, "vision_config.hidden_act")
    for field in ("patch_size", "temporal_patch_size", "spatial_merge_size"):
        if not isinstance(getattr(vision, field), int):
            raise UserError(f"vision_config.{field} = {getattr(vision, field)!r} is not supported (one integer)")
    rope = getattr(vision, "rope_parameters", None) or {}
    if rope.get("rope_type", "axial") not in ("axial", "default"):
        raise UserError(f"vision_config.rope_parameters.rope_type '{rope['rope_type']}' is not supported "
                        f"(supported: axial)")
    if vision.model_type == "qwen2_5_vl_vision":
        unit = vision.spatial_merge_size * vision.patch_size
        if vision.window_size % unit:
            raise UserError(f"vision_config.window_size {vision.window_size} is not a multiple of "
                            f"spatial_merge_size * patch_size ({unit})")
        bad = [i for i in vision.fullatt_block_indexes if not 0 <= i < vision.depth]
        if bad:
            raise UserError(f"vision_config.fullatt_block_indexes has {bad[0]}, beyond the {vision.depth} blocks")


def segment_attention(attn: EncoderAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      lengths: list[int]) -> torch.Tensor:
    """Bidirectional attention within consecutive segments of `lengths` rows ([rows, heads, dim] in and out):
    segments of one length run as one batch."""
    out = torch.empty_like(q)
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0).tolist()
    by_length: dict[int, list[int]] = {}
    for start, length in zip(starts, lengths):
        by_length.setdefault(length, []).append(start)
    for length, group in by_length.items():
        rows = (torch.tensor(group)[:, None] + torch.arange(length)[None, :]).to(q.device)  # [segments, length]
        out[rows] = attn(q[rows], k[rows], v[rows])
    return out


class VisionAttention(nn.Module):
    """Bidirectional attention within each image or frame (`lengths`), rotated by the patches' 2-D RoPE: Qwen2-VL's,
    Qwen3-VL's and (without biases) GLM-4.1V's."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.qkv = QKVParallelLinear(dim, self.head_dim, heads, heads, bias=qkv_bias)
        self.proj = RowParallelLinear(dim, dim, bias=proj_bias)
        self.attn = EncoderAttention(self.head_dim**-0.5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, -1, self.head_dim).unbind(1)
        q, k = (((t.float() * cos) + rotate_half(t.float()) * sin).to(t.dtype) for t in (q, k))  # RoPE in fp32
        return self.proj(segment_attention(self.attn, q, k, v, lengths).flatten(1))


class VisionMLP(nn.Module):
    """Qwen2-VL: fc1 -> act -> fc2."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(dim, hidden, bias=True)
        self.act = Activation(act)
        self.fc2 = RowParallelLinear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionGatedMLP(nn.Module):
    """Qwen2.5-VL: down(act(gate(x)) * up(x)), with biases."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(dim, [hidden, hidden], bias=True)
        self.act = ActAndMul(act)
        self.down_proj = RowParallelLinear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class VisionBlock(nn.Module):
    def __init__(self, vision: PretrainedConfig, qwen2_5: bool) -> None:
        super().__init__()
        dim = vision.hidden_size if qwen2_5 else vision.embed_dim
        if qwen2_5:
            self.norm1, self.norm2 = RMSNorm(dim, 1e-6), RMSNorm(dim, 1e-6)
            self.mlp = VisionGatedMLP(dim, vision.intermediate_size, vision.hidden_act)
        else:
            self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            self.mlp = VisionMLP(dim, int(dim * vision.mlp_ratio), vision.hidden_act)
        self.attn = VisionAttention(dim, vision.num_heads)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each 2x2 block of patches (four consecutive rows) -> one prompt position of the language model."""

    def __init__(self, context_dim: int, out_dim: int, merge: int, qwen2_5: bool) -> None:
        super().__init__()
        self.ln_q = RMSNorm(context_dim, 1e-6) if qwen2_5 else nn.LayerNorm(context_dim, eps=1e-6)
        self.hidden = context_dim * merge * merge
        # named as the checkpoint's nn.Sequential: mlp.0, (GELU), mlp.2
        self.mlp = nn.ModuleList([ColumnParallelLinear(self.hidden, self.hidden, bias=True), Activation("gelu"),
                                  RowParallelLinear(self.hidden, out_dim, bias=True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_q(x).view(-1, self.hidden)
        for layer in self.mlp:
            x = layer(x)
        return x


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d with kernel = stride = one patch: a matmul over each flattened patch."""

    def __init__(self, vision: PretrainedConfig, dim: int) -> None:
        super().__init__()
        shape = (dim, 3, vision.temporal_patch_size, vision.patch_size, vision.patch_size)
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(shape), requires_grad=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.flatten(1)
        return F.linear(pixels.to(weight.dtype), weight)


def window_order(grids: list[tuple[int, int, int]], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's windows: (the merge units in window order, the patches of each window). Each frame is cut
    into windows of `window` x `window` merge units from its top-left corner, windows row by row, units within a
    window row by row."""
    order, lengths, offset = [], [], 0
    for t, h, w in grids:
        units = torch.arange(t * (h // merge) * (w // merge)).view(t, h // merge, w // merge) + offset
        for frame in units:
            for top in range(0, frame.shape[0], window):
                for left in range(0, frame.shape[1], window):
                    block = frame[top : top + window, left : left + window].flatten()
                    order.append(block)
                    lengths.append(block.numel() * merge * merge)
        offset += units.numel()
    return torch.cat(order), lengths


class Qwen2VisionTransformer(nn.Module):
    def __init__(self, vision: PretrainedConfig, out_dim: int) -> None:
        super().__init__()
        check_vision_config(vision)
        self.qwen2_5 = vision.model_type == "qwen2_5_vl_vision"
        dim = vision.hidden_size if self.qwen2_5 else vision.embed_dim
        self.merge = vision.spatial_merge_size
        self.patch_embed = PatchEmbed(vision, dim)
        self.blocks = nn.ModuleList(VisionBlock(vision, self.qwen2_5) for _ in range(vision.depth))
        self.merger = PatchMerger(dim, out_dim, self.merge, self.qwen2_5)
        self.full_attention = set(vision.fullatt_block_indexes) if self.qwen2_5 else set(range(vision.depth))
        self.window = vision.window_size // self.merge // vision.patch_size if self.qwen2_5 else 0
        head_dim = dim // vision.num_heads
        theta = float((getattr(vision, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        quarter = torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2)
        self.register_buffer("inv_freq", 1.0 / theta**quarter, persistent=False)

    def rotary(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [patches, 1, head_dim] (fp32): the first quarter of the frequencies turn with the patch's row,
        the second with its column; the second half of the head repeats the first."""
        rows, cols = [], []
        m = self.merge
        for t, h, w in grids:  # patch coordinates in the processor's order: 2x2 blocks, row by row
            r = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m).transpose(1, 2).flatten()
            c = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m).transpose(1, 2).flatten()
            rows.append(r.repeat(t))
            cols.append(c.repeat(t))
        inv_freq = self.inv_freq
        angles = torch.cat([torch.cat(rows).to(inv_freq.device)[:, None] * inv_freq,
                            torch.cat(cols).to(inv_freq.device)[:, None] * inv_freq], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        return angles.cos(), angles.sin()

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixels [patches, 3 * 2 * 14 * 14], grid_thw [items, 3] -> [patches / 4, out_dim], in item order."""
        grids = [tuple(g) for g in grid_thw.tolist()]
        x = self.patch_embed(pixels)
        cos, sin = self.rotary(grids)
        frames = [h * w for t, h, w in grids for _ in range(t)]  # full attention: within each frame
        windows, order = frames, None
        if self.window:
            order, windows = window_order(grids, self.merge, self.window)
            order = order.to(x.device)
            unit = self.merge * self.merge
            x, cos, sin = (t.view(-1, unit, *t.shape[1:])[order].flatten(0, 1) for t in (x, cos, sin))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames if i in self.full_attention else windows)
        merged = self.merger(x)
        return merged if order is None else merged[torch.argsort(order)]
