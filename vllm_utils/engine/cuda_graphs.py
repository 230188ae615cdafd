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
        self.scratch_block = scratch_block
        # rows: token ids, positions, cache slots, context lengths; a padded row is one cached token in the
        # scratch block. Inputs go host -> pinned staging -> these buffers in two copies per step.
        self.padding = torch.tensor([0, 0, scratch_block * block_size, 1])
        self.rows_host = self.padding[:, None].repeat(1, top).pin_memory()
        self.tables_host = torch.full((top, max_blocks_per_seq), scratch_block, dtype=torch.int32).pin_memory()
        self.rows = self.rows_host.to(device)
        self.tables = self.tables_host.to(device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._capture()

    def _step(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[:, :batch]
        meta = AttentionMetadata(False, rows[2], block_tables=self.tables[:batch], context_lens=rows[3])
        logits = self.model.compute_logits(self.model(rows[0], rows[1], meta))
        return logits, logits.argmax(dim=-1)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for batch in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
            self._step(batch)  # warm-up: lazy initialisation must not happen inside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                logits, greedy = self._step(batch)
            pool = graph.pool()
            self.graphs[batch] = (graph, logits, greedy)
        torch.cuda.synchronize()

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def run(self, rows: torch.Tensor, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [4, n] int64 and tables [n, width] int32, on the host. Returns logits and argmax [n]."""
        n, width = tables.shape
        batch = next(b for b in self.buckets if b >= n)
        # the previous step's copies are done: its sampled tokens were read on the host
        self.rows_host[:, :n] = rows
        self.rows_host[:, n:batch] = self.padding[:, None]
        self.tables_host[:n, :width] = tables
        self.tables_host[n:batch, 0] = self.scratch_block
        self.rows[:, :batch].copy_(self.rows_host[:, :batch], non_blocking=True)
        self.tables[:batch].copy_(self.tables_host[:batch], non_blocking=True)
        graph, logits, greedy = self.graphs[batch]
        graph.replay()
        return logits[:n], greedy[:n]
