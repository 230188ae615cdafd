"""CLIP vision transformer, run only up to the layers LLaVA reads its image features from. Its encoder layer is
SigLIP's too."""
import torch
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.attention.encoder import EncoderAttention
from vllm_utils.layers.activation import Activation
from vllm_utils.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear


class CLIPAttention(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        heads = config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, heads, heads, bias=True)
        self.out_proj = RowParallelLinear(config.hidden_size, config.hidden_size, bias=True)
        self.local_heads = self.qkv_proj.num_heads
        self.attn = EncoderAttention(self.head_dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv_proj(x).view(batch, tokens, 3, self.local_heads, self.head_dim).unbind(2)
        return self.out_proj(self.attn(q, k, v).reshape(batch, tokens, -1))


class CLIPMLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=True)
        self.act = Activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size), requires_grad=False)
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(self.num_positions, config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTower(nn.Module):
    """Returns the hidden states after each of the first `num_layers` encoder layers that are asked for.
    Index 0 is the input of the first layer (after pre_layrnorm), as in transformers' hidden_states."""

    def __init__(self, config: PretrainedConfig, num_layers: int) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(num_layers))

    def forward(self, pixels: torch.Tensor, wanted: list[int]) -> list[torch.Tensor]:
        return hidden_states(self.pre_layrnorm(self.embeddings(pixels)), self.encoder.layers, wanted)


def hidden_states(x: torch.Tensor, layers: nn.ModuleList, wanted: list[int]) -> list[torch.Tensor]:
    """The hidden states `wanted` (0: the input of the first layer, i: the output of layer i), in that order."""
    states = {0: x} if 0 in wanted else {}
    for i, layer in enumerate(layers, start=1):
        x = layer(x)
        if i in wanted:
            states[i] = x
    return [states[i] for i in wanted]
