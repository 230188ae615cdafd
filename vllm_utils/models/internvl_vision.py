"""InternViT, the vision tower of InternVL (HF `InternVLVisionModel`), read top to bottom: a class token and the
tiles' patch embeddings with a learned position table (resampled bicubically where a tile's grid differs from it),
then pre-norm blocks (LayerNorm or RMSNorm) whose attention and MLP outputs are scaled per channel (layer scale,
`lambda_1`/`lambda_2`) before they join the residual stream. The larger towers (InternViT-6B) RMS-normalise q and k
over all heads together before attention. Only the layers up to the one the model reads are built."""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.attention.encoder import EncoderAttention
from vllm_utils.distributed import all_reduce, tp_rank, tp_size
from vllm_utils.errors import UserError
from vllm_utils.layers.activation import Activation, check_activation
from vllm_utils.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm_utils.layers.norm import RMSNorm
from vllm_utils.models.clip import hidden_states
from vllm_utils.multimodal.internvl import pair, patch_grid

NORM_TYPES = ("layer_norm", "rms_norm")
QK_NORM_EPS = 1e-6  # transformers builds the q/k norms with their default eps, whatever layer_norm_eps says


def check_vision_config(vision: PretrainedConfig) -> None:
    """Refuses, by name, every vision setting the tower does not implement. Implemented: norm_type, use_qk_norm,
    attention_bias, use_absolute_position_embeddings, use_mean_pooling (the final LayerNorm where off), the layer
    scales' loaded values; no switch at inference: use_mask_token (masked-image training), the dropouts and
    initial values (layer_scale_init_value, initializer_range)."""
    if getattr(vision, "model_type", None) != "internvl_vision":
        raise UserError(f"vision_config.model_type '{getattr(vision, 'model_type', None)}' is not supported "
                        f"(supported: internvl_vision)")
    check_activation(vision.hidden_act, "vision_config.hidden_act")
    if vision.norm_type not in NORM_TYPES:
        raise UserError(f"vision_config.norm_type '{vision.norm_type}' is not supported (supported: "
                        f"{', '.join(NORM_TYPES)})")
    if vision.hidden_size % vision.num_attention_heads:
        raise UserError(f"vision_config.hidden_size {vision.hidden_size} is not a multiple of num_attention_heads "
                        f"{vision.num_attention_heads}")
    (height, width), (patch_h, patch_w) = pair(vision.image_size), pair(vision.patch_size)
    if height != width or patch_h != patch_w or height % patch_h:
        raise UserError(f"vision_config.image_size {list(pair(vision.image_size))} with patch_size "
                        f"{list(pair(vision.patch_size))} is not supported: InternVL's pixel shuffle needs a square "
                        f"grid of whole patches")
    if vision.num_channels != 3:
        raise UserError(f"vision_config.num_channels = {vision.num_channels} is not supported (the processor gives "
                        f"RGB: 3)")


class QKNorm(nn.Module):
    """RMSNorm over the whole width of q (or k), all heads together, in float32 as transformers computes it. With
    tensor parallelism each rank holds its heads' channels: the sum of squares is reduced over the ranks."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.ones(width // tp_size()), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        size = param.shape[0]
        param.data.copy_(loaded.narrow(0, tp_rank() * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, x = x.dtype, x.float()
        if tp_size() == 1:
            variance = x.pow(2).mean(-1, keepdim=True)
        else:
            variance = all_reduce(x.pow(2).sum(-1, keepdim=True)) / self.width
        return self.weight * (x * torch.rsqrt(variance + QK_NORM_EPS)).to(dtype)


class InternVisionAttention(nn.Module):
    def __init__(self, vision: PretrainedConfig) -> None:
        super().__init__()
        dim, heads = vision.hidden_size, vision.num_attention_heads
        self.head_dim = dim // heads
        self.qkv_proj = QKVParallelLinear(dim, self.head_dim, heads, heads, bias=vision.attention_bias)
        self.local_heads = self.qkv_proj.num_heads
        if vision.use_qk_norm:
            self.q_norm, self.k_norm = QKNorm(dim), QKNorm(dim)
        self.projection_layer = RowParallelLinear(dim, dim, bias=True)
        self.attn = EncoderAttention(self.head_dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        shape = (batch, tokens, self.local_heads, self.head_dim)
        out = self.attn(q.reshape(shape), k.reshape(shape), v.reshape(shape))
        return self.projection_layer(out.reshape(batch, tokens, -1))


class InternVisionMLP(nn.Module):
    def __init__(self, vision: PretrainedConfig) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(vision.hidden_size, vision.intermediate_size, bias=True)
        self.act = Activation(vision.hidden_act)
        self.fc2 = RowParallelLinear(vision.intermediate_size, vision.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def make_norm(vision: PretrainedConfig) -> nn.Module:
    if vision.norm_type == "rms_norm":
        return RMSNorm(vision.hidden_size, vision.layer_norm_eps)
    return nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)


class InternVisionLayer(nn.Module):
    """x + lambda_1 * attn(norm(x)), then the same with the MLP and lambda_2."""

    def __init__(self, vision: PretrainedConfig) -> None:
        super().__init__()
        self.layernorm_before = make_norm(vision)
        self.attention = InternVisionAttention(vision)
        self.layernorm_after = make_norm(vision)
        self.mlp = InternVisionMLP(vision)
        self.lambda_1 = nn.Parameter(torch.ones(vision.hidden_size), requires_grad=False)
        self.lambda_2 = nn.Parameter(torch.ones(vision.hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lambda_1 * self.attention(self.layernorm_before(x)) + x
        return self.lambda_2 * self.mlp(self.layernorm_after(x)) + x


class InternVisionPatchEmbeddings(nn.Module):
    def __init__(self, vision: PretrainedConfig) -> None:
        super().__init__()
        patch = pair(vision.patch_size)
        self.projection = nn.Conv2d(vision.num_channels, vision.hidden_size, kernel_size=patch, stride=patch)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, vision: PretrainedConfig) -> None:
        super().__init__()
        self.patch_size = pair(vision.patch_size)
        grid = patch_grid(vision)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, vision.hidden_size), requires_grad=False)
        self.patch_embeddings = InternVisionPatchEmbeddings(vision)
        if vision.use_absolute_position_embeddings:
            self.position_embeddings = nn.Parameter(torch.zeros(1, grid * grid + 1, vision.hidden_size),
                                                    requires_grad=False)
        else:
            self.position_embeddings = None

    def positions(self, patches: int, height: int, width: int) -> torch.Tensor:
        """The position table, resampled bicubically to a tile's grid where it differs from the table's own (as
        transformers' `interpolate_pos_encoding`)."""
        table = self.position_embeddings
        known = table.shape[1] - 1
        if patches == known and height == width:
            return table
        side, dim = int(known**0.5), table.shape[-1]
        grid = table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height // self.patch_size[0], width // self.patch_size[1]), mode="bicubic",
                             align_corners=False)
        return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = pixels.shape[-2:]
        conv = self.patch_embeddings.projection
        patches = conv(pixels.to(conv.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(pixels.shape[0], -1, -1), patches], dim=1)
        if self.position_embeddings is not None:
            x = x + self.positions(patches.shape[1], height, width)
        return x


class InternVisionModel(nn.Module):
    """[tiles, 3, H, W] -> the hidden state `feature_layer` reads, [tiles, 1 + patches, hidden]: -1 the last
    layer's output after the final LayerNorm (present where use_mean_pooling is off), i >= 0 the output of layer i
    (0: the embeddings), other negative values counted from the end, as transformers' hidden_states."""

    def __init__(self, vision: PretrainedConfig, feature_layer: int) -> None:
        super().__init__()
        layers = vision.num_hidden_layers
        self.wanted = feature_layer % (layers + 1) if feature_layer != -1 else layers
        self.final_norm = feature_layer == -1 and not vision.use_mean_pooling
        self.embeddings = InternVisionEmbeddings(vision)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(InternVisionLayer(vision) for _ in range(self.wanted))
        if self.final_norm:
            self.layernorm = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = hidden_states(self.embeddings(pixels), self.encoder.layer, [self.wanted])[0]
        return self.layernorm(x) if self.final_norm else x
