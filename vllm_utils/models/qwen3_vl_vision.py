"""The vision tower of Qwen3-VL, read top to bottom. Pixels arrive as Qwen2-VL's do (rows of flattened 16x16
patches two frames deep, each 2x2 block of patches four consecutive rows); each patch is embedded by the checkpoint's
Conv3d (with bias) and given the learned position table (`num_position_embeddings`, a square) resampled bilinearly,
corners aligned, to its frame's grid, as transformers gathers it (four taps, weights summed in its order). Attention
is bidirectional within each frame, rotated by 2-D RoPE on the patch's (row, column); blocks are LayerNorm with a
plain MLP. The merger joins each 2x2 block into one position of the language model; DeepStack: the outputs of the
blocks `deepstack_visual_indexes` are merged each by its own merger (LayerNorm after the 2x2 join) and returned too."""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.layers.activation import Activation, check_activation
from vllm_utils.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm_utils.models.glm4v_vision import patch_coordinates
from vllm_utils.models.qwen2_vl_vision import VisionAttention


def check_vision_config(vision: PretrainedConfig) -> None:
    """Refuses, by name, vision settings the tower does not implement."""
    check_activation(vision.hidden_act, "vision_config.hidden_act")
    for field in ("patch_size", "temporal_patch_size", "spatial_merge_size"):
        if not isinstance(getattr(vision, field), int):
            raise UserError(f"vision_config.{field} = {getattr(vision, field)!r} is not supported (one integer)")
    rope = getattr(vision, "rope_parameters", None) or {}
    if rope.get("rope_type", "axial") != "axial":
        raise UserError(f"vision_config.rope_parameters.rope_type '{rope['rope_type']}' is not supported "
                        f"(supported: axial)")
    if vision.hidden_size % vision.num_heads:
        raise UserError(f"vision_config.hidden_size {vision.hidden_size} is not a multiple of num_heads "
                        f"{vision.num_heads}")
    side = int(vision.num_position_embeddings**0.5)
    if side * side != vision.num_position_embeddings:
        raise UserError(f"vision_config.num_position_embeddings {vision.num_position_embeddings} is not a square")
    bad = [i for i in getattr(vision, "deepstack_visual_indexes", []) if not 0 <= i < vision.depth]
    if bad:
        raise UserError(f"vision_config.deepstack_visual_indexes has {bad[0]}, beyond the {vision.depth} blocks")


def _axis_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps (floor, floor + 1, clamped) into a `side`-long table and their weights, corners aligned: the
    closed form of linspace(0, side - 1, size)[index], in transformers' float32 operations."""
    src = index.float() * (side - 1) / torch.clamp(size - 1, min=1)
    floor = torch.floor(src)
    offsets = torch.arange(2, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


class VisionMLP(nn.Module):
    """linear_fc1 -> act -> linear_fc2, with biases."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.linear_fc1 = ColumnParallelLinear(dim, hidden, bias=True)
        self.act = Activation(act)
        self.linear_fc2 = RowParallelLinear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, vision: PretrainedConfig) -> None:
        super().__init__()
        dim = vision.hidden_size
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, vision.num_heads)
        self.mlp = VisionMLP(dim, vision.intermediate_size, vision.hidden_act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each 2x2 block of patches (four consecutive rows) -> one position: LayerNorm (over each patch, or with
    `postshuffle` over the joined block, as DeepStack's mergers), fc1, GELU, fc2."""

    def __init__(self, vision: PretrainedConfig, postshuffle: bool) -> None:
        super().__init__()
        self.hidden = vision.hidden_size * vision.spatial_merge_size**2
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(self.hidden if postshuffle else vision.hidden_size, eps=1e-6)
        self.linear_fc1 = ColumnParallelLinear(self.hidden, self.hidden, bias=True)
        self.act = Activation("gelu")
        self.linear_fc2 = RowParallelLinear(self.hidden, vision.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.hidden)) if self.postshuffle else self.norm(x).view(-1, self.hidden)
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d with kernel = stride = one patch: a matmul over each flattened patch, plus bias."""

    def __init__(self, vision: PretrainedConfig) -> None:
        super().__init__()
        shape = (vision.hidden_size, vision.in_channels, vision.temporal_patch_size, vision.patch_size,
                 vision.patch_size)
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.proj.bias = nn.Parameter(torch.empty(vision.hidden_size), requires_grad=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.flatten(1)
        return F.linear(pixels.to(weight.dtype), weight, self.proj.bias)


class Qwen3VLVisionTransformer(nn.Module):
    def __init__(self, vision: PretrainedConfig) -> None:
        super().__init__()
        check_vision_config(vision)
        dim, self.merge = vision.hidden_size, vision.spatial_merge_size
        self.patch_embed = PatchEmbed(vision)
        self.pos_embed = nn.Module()  # the checkpoint's nn.Embedding: the learned square grid, row by row
        self.pos_embed.weight = nn.Parameter(torch.empty(vision.num_position_embeddings, dim), requires_grad=False)
        self.side = int(vision.num_position_embeddings**0.5)
        self.blocks = nn.ModuleList(VisionBlock(vision) for _ in range(vision.depth))
        self.merger = PatchMerger(vision, postshuffle=False)
        self.deepstack_indexes = list(getattr(vision, "deepstack_visual_indexes", []))  # Qwen3.5's tower: none
        self.deepstack_merger_list = nn.ModuleList(PatchMerger(vision, postshuffle=True)
                                                   for _ in self.deepstack_indexes)
        head_dim = dim // vision.num_heads
        theta = float((getattr(vision, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        quarter = torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2)
        self.register_buffer("inv_freq", 1.0 / theta**quarter, persistent=False)

    def position_embeddings(self, rows: torch.Tensor, cols: torch.Tensor, heights: torch.Tensor,
                            widths: torch.Tensor) -> torch.Tensor:
        """Each patch's learned position: the table resampled to its frame's grid (bilinear, corners aligned), as
        transformers' four gathered taps weighted and summed."""
        h_taps, h_weights = _axis_taps(rows, heights, self.side)
        w_taps, w_weights = _axis_taps(cols, widths, self.side)
        indices = (h_taps[:, :, None] * self.side + w_taps[:, None, :]).reshape(-1, 4)
        weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
        return (F.embedding(indices, self.pos_embed.weight) * weights[:, :, None]).sum(1)  # fp32 weights, as HF

    def rotary(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [patches, 1, head_dim] (fp32): the first quarter of the frequencies turn with the patch's row,
        the second with its column; the second half of the head repeats the first."""
        angles = torch.cat([rows[:, None].float() * self.inv_freq, cols[:, None].float() * self.inv_freq], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        return angles.cos(), angles.sin()

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixels [patches, 3 * 2 * 16 * 16], grid_thw [items, 3] -> ([patches / 4, out_hidden_size], one such
        tensor per DeepStack index), in item order."""
        grids = [tuple(g) for g in grid_thw.tolist()]
        device = self.inv_freq.device
        rows, cols = (c.to(device) for c in patch_coordinates(grids, self.merge))
        sizes = torch.tensor([(h, w) for t, h, w in grids for _ in range(t * h * w)], device=device).view(-1, 2)
        x = self.patch_embed(pixels)
        x = x + self.position_embeddings(rows, cols, sizes[:, 0], sizes[:, 1]).to(x.dtype)
        cos, sin = self.rotary(rows, cols)
        frames = [h * w for t, h, w in grids for _ in range(t)]  # attention within each frame
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames)
            if i in self.deepstack_indexes:
                deepstack.append(self.deepstack_merger_list[self.deepstack_indexes.index(i)](x))
        return self.merger(x), deepstack
