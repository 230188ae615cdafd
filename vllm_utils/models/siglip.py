"""SigLIP vision transformer: CLIP's encoder layers on patch embeddings with a bias and no class token, no pre-norm.
LLaVA-Interleave and LLaVA-OneVision run it only up to the layers they read (`SiglipVisionTower`); DeepSeek-VL reads
its last hidden state, after post_layernorm (`SiglipVisionModel`). The pooling head never runs."""
import torch
from torch import nn
from transformers import PretrainedConfig

from vllm_utils.models.clip import CLIPEncoderLayer, hidden_states


class SiglipEmbeddings(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.num_positions = (config.image_size // config.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size)
        self.position_embedding = nn.Embedding(self.num_positions, config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return patches + self.position_embedding.weight


class SiglipVisionTower(nn.Module):
    """Returns the hidden states after each of the first `num_layers` encoder layers that are asked for (index 0:
    the embeddings), as in transformers' hidden_states."""

    def __init__(self, config: PretrainedConfig, num_layers: int) -> None:
        super().__init__()
        self.embeddings = SiglipEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(num_layers))

    def forward(self, pixels: torch.Tensor, wanted: list[int]) -> list[torch.Tensor]:
        return hidden_states(self.embeddings(pixels), self.encoder.layers, wanted)


class SiglipVisionModel(SiglipVisionTower):
    """Every layer, then post_layernorm: [images, 3, H, W] -> [images, patches, hidden]."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config, config.num_hidden_layers)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(super().forward(pixels, [len(self.encoder.layers)])[0])
