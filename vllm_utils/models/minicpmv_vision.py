"""MiniCPM-V 4.6's vision tower (transformers' `MiniCPMV4_6VisionModel`): SigLIP's encoder layers on NaViT-packed
slices of any shape, each slice attending only to itself. A slice's patches take the learned position table's rows
by nearest bucket (its grid stretched over the table's side). After layer `insert_layer_id` the window merger folds
each 2x2 window of patches into one: attention within the window, then an MLP over the window's four patches plus
their mean; the later layers run on the quarter-size grids. post_layernorm ends it. Rows are patches in each slice's
row-major order, slices in prompt order; `sizes` gives each slice's (height, width) in patches."""
import torch
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.attention.encoder import EncoderAttention
from vllm_utils.errors import UserError
from vllm_utils.layers.activation import Activation, check_activation
from vllm_utils.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm_utils.models.clip import CLIPMLP
from vllm_utils.models.qwen2_vl_vision import segment_attention

WINDOW = 2  # the window merger's (and the merger's) 2x2 blocks: transformers halves the grids by this, whatever
# window_kernel_size says


def check_vision_config(vision: PretrainedConfig, insert_layer_id: int) -> None:
    """Refuses, by name, every vision setting the tower does not implement."""
    check_activation(vision.hidden_act, "vision_config.hidden_act")
    if vision.num_channels != 3:
        raise UserError(f"vision_config.num_channels = {vision.num_channels} is not supported (the processor gives "
                        f"RGB: 3)")
    for field in ("image_size", "patch_size"):
        if not isinstance(getattr(vision, field), int):
            raise UserError(f"vision_config.{field} = {getattr(vision, field)!r} is not supported (one integer: "
                            f"square patches and a square position table)")
    if list(vision.window_kernel_size) != [WINDOW, WINDOW]:
        raise UserError(f"vision_config.window_kernel_size = {list(vision.window_kernel_size)} is not supported "
                        f"(only [2, 2]: transformers halves the grids after the window merger whatever it says)")
    if vision.hidden_size % vision.num_attention_heads:
        raise UserError(f"vision_config.hidden_size {vision.hidden_size} is not a multiple of "
                        f"num_attention_heads {vision.num_attention_heads}")
    if not 0 <= insert_layer_id < vision.num_hidden_layers:
        raise UserError(f"insert_layer_id = {insert_layer_id} is not supported (the index of one of the "
                        f"{vision.num_hidden_layers} vision layers, after which the window merger runs)")


def position_ids(sizes: list[tuple[int, int]], side: int) -> torch.Tensor:
    """Each patch's row of the side x side position table: its fractional coordinates bucketed (transformers'
    `get_vision_nearest_position_ids`, the same float32 steps)."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    ids = []
    for height, width in sizes:
        rows = torch.bucketize(torch.arange(height) / height, boundaries, right=True)
        cols = torch.bucketize(torch.arange(width) / width, boundaries, right=True)
        ids.append((rows[:, None] * side + cols).flatten())
    return torch.cat(ids)


def window_order(sizes: list[tuple[int, int]]) -> torch.Tensor:
    """The rows in window order: each slice's 2x2 windows row-major, a window's patches row-major (transformers'
    `get_vision_window_index` on grids of even sides)."""
    order, start = [], 0
    for height, width in sizes:
        if height % WINDOW or width % WINDOW:
            raise UserError(f"a slice of {height} x {width} patches cannot be cut into 2x2 windows; the image "
                            f"processor's settings do not match the model's")
        grid = torch.arange(height * width).view(height // WINDOW, WINDOW, width // WINDOW, WINDOW)
        order.append(grid.permute(0, 2, 1, 3).flatten() + start)
        start += height * width
    return torch.cat(order)


class VisionAttention(nn.Module):
    """Bidirectional attention within consecutive segments of rows (q/k/v/out projections with biases)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.head_dim = hidden // heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, heads, heads, bias=True)
        self.out_proj = RowParallelLinear(hidden, hidden, bias=True)
        self.attn = EncoderAttention(self.head_dim**-0.5)

    def forward(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).view(x.shape[0], 3, -1, self.head_dim).unbind(1)
        return self.out_proj(segment_attention(self.attn, q, k, v, lengths).flatten(1))


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), lengths)
        return x + self.mlp(self.layer_norm2(x))


class WindowMerger(nn.Module):
    """transformers' `MiniCPMV4_6ViTWindowAttentionMerger`: [patches, hidden] -> [patches / 4, hidden], each output
    row a window, row-major over each slice's halved grid."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        hidden, window = config.hidden_size, WINDOW * WINDOW
        self.self_attn = VisionAttention(hidden, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.pre_norm = nn.LayerNorm(hidden * window, eps=config.layer_norm_eps)
        self.linear_1 = ColumnParallelLinear(hidden * window, config.intermediate_size * window, bias=True)
        self.act = Activation("gelu_pytorch_tanh")  # fixed in transformers, whatever hidden_act says
        self.linear_2 = RowParallelLinear(config.intermediate_size * window, hidden, bias=True)

    def forward(self, x: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        order = window_order(sizes).to(x.device)
        window = WINDOW * WINDOW
        x = x[order]
        x = x + self.self_attn(self.layer_norm1(x), [window] * (x.shape[0] // window))
        windows = x.view(-1, window, x.shape[-1])
        out = self.linear_2(self.act(self.linear_1(self.pre_norm(windows.flatten(1)))))
        return out + windows.mean(dim=1)


class MiniCPMVisionModel(nn.Module):
    def __init__(self, config: PretrainedConfig, insert_layer_id: int, window_merger: bool) -> None:
        super().__init__()
        self.side = config.image_size // config.patch_size
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                                    stride=config.patch_size)
        self.embeddings.position_embedding = nn.Embedding(self.side**2, config.hidden_size)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.vit_merger = WindowMerger(config)
        # downsample_mode "4x" skips the window merger (its weights are still in the checkpoint)
        self.insert_after = insert_layer_id if window_merger else None

    def forward(self, patches: torch.Tensor, sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, list]:
        """patches [rows, 3, p, p] -> ([rows or rows / 4, hidden], each slice's (height, width) at the end)."""
        conv = self.embeddings.patch_embedding
        x = conv(patches.to(conv.weight.dtype)).flatten(1)
        x = x + self.embeddings.position_embedding(position_ids(sizes, self.side).to(x.device))
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x, [h * w for h, w in sizes])
            if i == self.insert_after:
                x = self.vit_merger(x, sizes)
                sizes = [(h // WINDOW, w // WINDOW) for h, w in sizes]
        return self.post_layernorm(x), sizes
