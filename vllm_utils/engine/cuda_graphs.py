"""Graph mode: the decode step (model + LM head) captured as CUDA graphs, one per batch-size bucket,
over static input buffers. A batch is padded up to its bucket; padded rows write their K/V into a
scratch block that no sequence owns."""
import torch
from torch import nn

from vllm_utils.attention.backend import AttentionMetadata


def batch_buckets(max_batch: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch + 16, 16)) if max_batch > 8 else small + [max_batch]


class DecodeGraphs:
    def __init__(self, model: nn.Module, max_batch: int, max_blocks_per_seq: int, scratch_block: int,
                 block_size: int, device: torch.device) -> None:
        self.model = model
        self.buckets = batch_buckets(max_batch)
        top = self.buckets[-1]
        self.scratch_block, self.scratch_slot = scratch_block, scratch_block * block_size
        self.ids = torch.zeros(top, dtype=torch.int64, device=device)
        self.positions = torch.zeros(top, dtype=torch.int64, device=device)
        self.slots = torch.full((top,), self.scratch_slot, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(top, dtype=torch.int32, device=device)
        self.block_tables = torch.full((top, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture()

    def _step(self, batch: int) -> torch.Tensor:
        meta = AttentionMetadata(False, self.slots[:batch], block_tables=self.block_tables[:batch],
                                 context_lens=self.context_lens[:batch])
        return self.model.compute_logits(self.model(self.ids[:batch], self.positions[:batch], meta))

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for batch in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
            self._step(batch)  # warm-up: lazy initialisation must not happen inside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                logits = self._step(batch)
            pool = graph.pool()
            self.graphs[batch] = (graph, logits)
        torch.cuda.synchronize()

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = ids.shape[0]
        batch = next(b for b in self.buckets if b >= n)
        width = meta.block_tables.shape[1]
        self.ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(meta.slot_mapping)
        self.context_lens[:n].copy_(meta.context_lens)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        if batch > n:  # padded rows: one cached token, in the scratch block
            self.slots[n:batch].fill_(self.scratch_slot)
            self.context_lens[n:batch].fill_(1)
            self.block_tables[n:batch, 0].fill_(self.scratch_block)
        graph, logits = self.graphs[batch]
        graph.replay()
        return logits[:n]
