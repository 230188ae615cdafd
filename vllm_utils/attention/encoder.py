"""Bidirectional attention over whole images, for vision towers (no cache)."""
import torch
import torch.nn.functional as F

from vllm_utils.layers.op import Op


class EncoderAttention(Op):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [batch, tokens, heads, dim] -> [batch, tokens, heads, dim]."""
        return self.run(q, k, v)

    def forward_native(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             scale=self.scale)
        return out.transpose(1, 2)
