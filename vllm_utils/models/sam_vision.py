"""SAM's ViTDet image encoder (GOT-OCR2's tower, the high-resolution branch of DeepSeek-VL-hybrid): a patch grid
kept 2-D, absolute position embeddings, layers attending within windows (or globally at `global_attn_indexes`) with
decomposed relative-position biases, then the conv neck. Replicated on every tensor-parallel rank."""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.layers.activation import Activation, check_activation
from vllm_utils.layers.linear import LinearBase


def check_sam_config(config: PretrainedConfig, field: str, need_global: bool = True) -> None:
    """Refuses, by name, what this encoder does not implement (`need_global`: a reader of a global layer's output
    needs one)."""
    check_activation(config.hidden_act, f"{field}.hidden_act")
    for name in ("image_size", "patch_size"):
        if not isinstance(getattr(config, name), int):
            raise UserError(f"{field}.{name} = {getattr(config, name)!r} is not supported (one integer: square "
                            f"pages and patches)")
    if config.image_size % config.patch_size:
        raise UserError(f"{field}.image_size {config.image_size} is not a multiple of its patch_size "
                        f"{config.patch_size}")
    if need_global and not config.global_attn_indexes:
        raise UserError(f"{field}.global_attn_indexes is empty: the fused features need a global layer")


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of [batch, channels, height, width]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SamNeck(nn.Module):
    """[batch, height, width, hidden] -> [batch, output_channels, height, width]: a 1x1 and a 3x3 conv, each
    followed by a LayerNorm over channels."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        channels = config.output_channels
        self.conv1 = nn.Conv2d(config.hidden_size, channels, kernel_size=1, bias=False)
        self.layer_norm1 = ChannelsFirstLayerNorm(channels, eps=1e-6)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.layer_norm2 = ChannelsFirstLayerNorm(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm2(self.conv2(self.layer_norm1(self.conv1(x.permute(0, 3, 1, 2)))))


def _relative_table(size: int, table: torch.Tensor) -> torch.Tensor:
    """[size, size, dim]: the embedding of each query-key offset along one axis (the learned table resized when
    the grid differs from the one it was trained for)."""
    length = 2 * size - 1
    if table.shape[0] != length:
        table = F.interpolate(table.T[None], size=length, mode="linear")[0].T
    offsets = torch.arange(size)[:, None] - torch.arange(size)[None, :] + size - 1
    return table[offsets.to(table.device)]


class SamAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, window: int) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.qkv = LinearBase(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = LinearBase(config.hidden_size, config.hidden_size, bias=True)
        self.use_rel_pos = config.use_rel_pos
        if self.use_rel_pos:
            size = window or config.image_size // config.patch_size
            self.rel_pos_h = nn.Parameter(torch.empty(2 * size - 1, self.head_dim), requires_grad=False)
            self.rel_pos_w = nn.Parameter(torch.empty(2 * size - 1, self.head_dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[windows, height, width, hidden] -> the same, each window attending within itself."""
        batch, height, width, _ = x.shape
        q, k, v = self.qkv(x).view(batch, height * width, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        bias = None
        if self.use_rel_pos:  # decomposed: a query's bias is its row's offset term plus its column's
            grid_q = q.reshape(batch, self.heads, height, width, self.head_dim)
            rows = torch.einsum("bnhwc,hkc->bnhwk", grid_q, _relative_table(height, self.rel_pos_h))
            cols = torch.einsum("bnhwc,wkc->bnhwk", grid_q, _relative_table(width, self.rel_pos_w))
            bias = (rows[..., :, None] + cols[..., None, :]).reshape(batch, self.heads, height * width, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.head_dim**-0.5)
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, -1))


class SamMLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.lin1 = LinearBase(config.hidden_size, config.mlp_dim, bias=True)
        self.act = Activation(config.hidden_act)
        self.lin2 = LinearBase(config.mlp_dim, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class SamLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, window: int) -> None:
        super().__init__()
        self.window = window
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = SamAttention(config, window)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SamMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, height, width, hidden]"""
        h = self.layer_norm1(x)
        if self.window:
            h = _unpartition(self.attn(_partition(h, self.window)), self.window, x.shape)
        else:
            h = self.attn(h)
        x = x + h
        return x + self.mlp(self.layer_norm2(x))


def _partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[batch, height, width, c] -> [batch * windows, window, window, c], the grid zero-padded to whole windows."""
    batch, height, width, channels = x.shape
    x = F.pad(x, (0, 0, 0, -width % window, 0, -height % window))
    rows, cols = x.shape[1] // window, x.shape[2] // window
    x = x.view(batch, rows, window, cols, window, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, channels)


def _unpartition(x: torch.Tensor, window: int, shape: torch.Size) -> torch.Tensor:
    """The inverse of `_partition`: the windows back in a [batch, height, width, c] grid, padding dropped."""
    batch, height, width, _ = shape
    rows, cols = -(-height // window), -(-width // window)
    x = x.view(batch, rows, cols, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, rows * window, cols * window, -1)[:, :height, :width]


class SamVisionEncoder(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.projection = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                                stride=config.patch_size)
        grid = config.image_size // config.patch_size
        self.pos_embed = nn.Parameter(torch.empty(1, grid, grid, config.hidden_size), requires_grad=False) \
            if config.use_abs_pos else None
        self.layers = nn.ModuleList(
            SamLayer(config, 0 if i in config.global_attn_indexes else config.window_size)
            for i in range(config.num_hidden_layers))
        self.neck = SamNeck(config)

    def forward(self, pixels: torch.Tensor, wanted: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pixels [batch, 3, H, W] -> (the neck's output [batch, output_channels, H/p, W/p], the output of layer
        `wanted` [batch, H/p, W/p, hidden], if one is)."""
        x = self.patch_embed.projection(pixels.to(self.patch_embed.projection.weight.dtype)).permute(0, 2, 3, 1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        kept = None
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == wanted:
                kept = x
        return self.neck(x), kept
