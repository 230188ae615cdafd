"""Vocabulary-parallel token embedding and LM head."""
import torch
import torch.nn.functional as F
from torch import nn

from vllm_utils.layers.linear import LinearOp
from vllm_utils.distributed import all_gather_last_dim, all_reduce, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, scale: float | None = None) -> None:
        """`scale`: a factor the embeddings are multiplied by, in the model dtype (Gemma's sqrt(hidden))."""
        super().__init__()
        self.register_buffer("scale", None if scale is None else torch.tensor(scale, dtype=torch.float32),
                             persistent=False)
        self.vocab_size = vocab_size
        self.shard = (vocab_size + tp_size() - 1) // tp_size()
        self.start = tp_rank() * self.shard
        self.weight = nn.Parameter(torch.empty(self.shard, hidden), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        rows = loaded[self.start : self.start + self.shard]
        param.data.zero_()
        param.data[: rows.shape[0]].copy_(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            y = F.embedding(ids, self.weight)
        else:
            local = ids - self.start
            in_shard = (local >= 0) & (local < self.shard)
            y = all_reduce(F.embedding(local.clamp(0, self.shard - 1), self.weight) * in_shard.unsqueeze(-1))
        return y if self.scale is None else y * self.scale.to(y.dtype)


class ParallelLMHead(VocabParallelEmbedding, LinearOp):
    """The vocabulary-sharded output projection: each rank computes its logits, gathered into the whole row."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = all_gather_last_dim(self.run(hidden, None))
        return logits[..., : self.vocab_size]


def embed_with_mm(embed_tokens: VocabParallelEmbedding, input_ids: torch.Tensor, mm_embeds: torch.Tensor | None,
                  mm_mask: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings, with the prompt's multimodal positions (`mm_mask`) replaced by the rows of `mm_embeds` in
    order (rows past the last such position are ignored). Generated tokens keep their own embedding, whatever
    their id. A gather, not a masked write: no host synchronisation, so a CUDA graph can hold it."""
    if mm_embeds is None:
        return embed_tokens(input_ids)
    embeds = embed_tokens(input_ids.masked_fill(mm_mask, 0))
    source = (mm_mask.cumsum(0) - 1).clamp(min=0)  # the multimodal row each marked position takes
    return torch.where(mm_mask[:, None], mm_embeds[source].to(embeds.dtype), embeds)
