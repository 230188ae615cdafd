"""The vision tower of GLM-4.1V, read top to bottom. Pixels arrive as Qwen2-VL's do (rows of flattened 14x14
patches two frames deep, each 2x2 block of patches four consecutive rows); each patch is embedded by the
checkpoint's Conv3d, RMS-normed, and given the learned position grid (image_size / patch_size a side) resampled
bicubically to its frame's own grid. Attention is bidirectional within each frame, rotated by 2-D RoPE on the
patch's (row, column); blocks are RMSNorm with a gated MLP. A 2x2 convolution then merges each block of patches
into one position, and a gated merger maps it into the language model."""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.layers.activation import ActAndMul, check_activation
from vllm_utils.layers.linear import LinearBase, MergedColumnParallelLinear, RowParallelLinear
from vllm_utils.layers.norm import RMSNorm
from vllm_utils.models.qwen2_vl_vision import VisionAttention


def check_vision_config(vision: PretrainedConfig) -> None:
    """Refuses, by name, vision settings the tower does not implement."""
    check_activation(vision.hidden_act, "vision_config.hidden_act")
    for field in ("patch_size", "temporal_patch_size", "spatial_merge_size", "image_size"):
        if not isinstance(getattr(vision, field), int):
            raise UserError(f"vision_config.{field} = {getattr(vision, field)!r} is not supported (one integer)")
    rope = getattr(vision, "rope_parameters", None) or {}
    if rope.get("rope_type", "axial") != "axial":
        raise UserError(f"vision_config.rope_parameters.rope_type '{rope['rope_type']}' is not supported "
                        f"(supported: axial)")
    if vision.hidden_size % vision.num_heads:
        raise UserError(f"vision_config.hidden_size {vision.hidden_size} is not a multiple of num_heads "
                        f"{vision.num_heads}")


def patch_coordinates(grids: list[tuple[int, int, int]], merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every patch in the processor's order: each frame's 2x2 blocks row by row, the four patches
    of a block row by row; frames of an item repeat their coordinates."""
    rows, cols = [], []
    for t, h, w in grids:
        r = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
        c = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
        rows.append(r.transpose(1, 2).flatten().repeat(t))
        cols.append(c.transpose(1, 2).flatten().repeat(t))
    return torch.cat(rows), torch.cat(cols)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), no biases: the blocks' MLP and the merger's."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(dim, [hidden, hidden], bias=False)
        self.act = ActAndMul(act)
        self.down_proj = RowParallelLinear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class VisionBlock(nn.Module):
    def __init__(self, vision: PretrainedConfig) -> None:
        super().__init__()
        dim = vision.hidden_size
        self.norm1, self.norm2 = RMSNorm(dim, vision.rms_norm_eps), RMSNorm(dim, vision.rms_norm_eps)
        self.attn = VisionAttention(dim, vision.num_heads, qkv_bias=vision.attention_bias, proj_bias=False)
        self.mlp = GatedMLP(dim, vision.out_hidden_size, vision.hidden_act)  # transformers' width: out_hidden_size

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(GatedMLP):
    """proj -> LayerNorm -> GELU -> the gated MLP of intermediate_size, on each merged position."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__(dim, hidden, act)
        self.proj = LinearBase(dim, dim, bias=False)  # whole on every rank: the LayerNorm needs all features
        self.post_projection_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.gelu(self.post_projection_norm(self.proj(x))))


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


class PositionEmbedding(nn.Module):
    """The learned square grid of position embeddings, sampled bicubically (border-clamped) at each patch's centre
    within its frame, as transformers' Glm4vVisionEmbeddings does with grid_sample."""

    def __init__(self, vision: PretrainedConfig) -> None:
        super().__init__()
        side = vision.image_size // vision.patch_size
        self.position_embedding = nn.Module()
        self.position_embedding.weight = nn.Parameter(torch.empty(side * side, vision.hidden_size),
                                                      requires_grad=False)

    def forward(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, heights: torch.Tensor,
                widths: torch.Tensor) -> torch.Tensor:
        """x [patches, dim]; each patch's (row, column) and its frame's (height, width) in patches."""
        weight = self.position_embedding.weight
        side = int(weight.shape[0] ** 0.5)
        table = weight.view(side, side, -1).permute(2, 0, 1).unsqueeze(0).float()
        norm_w = ((cols + 0.5) / widths) * 2 - 1  # [-1, 1], pixel centres (align_corners=False)
        norm_h = ((rows + 0.5) / heights) * 2 - 1
        grid = torch.stack((norm_w, norm_h), dim=-1)[None, :, None]
        sampled = F.grid_sample(table, grid, mode="bicubic", align_corners=False, padding_mode="border")
        return x + sampled[0, :, :, 0].T.to(weight.dtype)


class Glm4vVisionTransformer(nn.Module):
    def __init__(self, vision: PretrainedConfig) -> None:
        super().__init__()
        check_vision_config(vision)
        dim, self.merge, self.out_dim = vision.hidden_size, vision.spatial_merge_size, vision.out_hidden_size
        self.patch_embed = PatchEmbed(vision)
        self.post_conv_layernorm = RMSNorm(dim, vision.rms_norm_eps)
        self.embeddings = PositionEmbedding(vision)
        self.blocks = nn.ModuleList(VisionBlock(vision) for _ in range(vision.depth))
        self.post_layernorm = RMSNorm(dim, vision.rms_norm_eps)
        self.downsample = nn.Module()  # the checkpoint's Conv2d, kernel = stride = the merge block
        self.downsample.weight = nn.Parameter(torch.empty(self.out_dim, dim, self.merge, self.merge),
                                              requires_grad=False)
        self.downsample.bias = nn.Parameter(torch.empty(self.out_dim), requires_grad=False)
        self.merger = PatchMerger(self.out_dim, vision.intermediate_size, vision.hidden_act)
        head_dim = dim // vision.num_heads
        theta = float((getattr(vision, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        quarter = torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2)
        self.register_buffer("inv_freq", 1.0 / theta**quarter, persistent=False)

    def rotary(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [patches, 1, head_dim] (fp32): the first quarter of the frequencies turn with the patch's row,
        the second with its column; the second half of the head repeats the first."""
        angles = torch.cat([rows[:, None] * self.inv_freq, cols[:, None] * self.inv_freq], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        return angles.cos(), angles.sin()

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixels [patches, 3 * 2 * 14 * 14], grid_thw [items, 3] -> [patches / 4, out_hidden_size], in order."""
        grids = [tuple(g) for g in grid_thw.tolist()]
        device = self.inv_freq.device
        rows, cols = (c.to(device) for c in patch_coordinates(grids, self.merge))
        sizes = torch.tensor([(h, w) for t, h, w in grids for _ in range(t * h * w)], dtype=torch.float32,
                             device=device).view(-1, 2)
        x = self.post_conv_layernorm(self.patch_embed(pixels))
        cos, sin = self.rotary(rows.float(), cols.float())
        x = self.embeddings(x, rows, cols, sizes[:, 0], sizes[:, 1])
        frames = [h * w for t, h, w in grids for _ in range(t)]  # attention within each frame
        for block in self.blocks:
            x = block(x, cos, sin, frames)
        x = self.post_layernorm(x).view(-1, self.merge, self.merge, x.shape[-1]).permute(0, 3, 1, 2)
        x = F.conv2d(x, self.downsample.weight, self.downsample.bias, stride=self.merge).view(-1, self.out_dim)
        return self.merger(x)
