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


class VisionGraphs:
    """The vision tower + projector captured for 1, 2, 4 and 8 images (every image has the processor's
    fixed size, so shapes are static): prefill of an image prompt launches one graph instead of ~300
    kernels from Python. More images run in chunks of 8."""

    BUCKETS = (1, 2, 4, 8)

    def __init__(self, model: nn.Module, image_shape: tuple[int, int, int], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model = model
        self.pixels = torch.zeros(self.BUCKETS[-1], *image_shape, dtype=dtype, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        with torch.inference_mode():
            pool = None
            for count in reversed(self.BUCKETS):
                self.model.encode_images(self.pixels[:count])  # warm-up outside capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    features = self.model.encode_images(self.pixels[:count])
                pool = graph.pool()
                self.graphs[count] = (graph, features)
        torch.cuda.synchronize()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[images, 3, H, W] on the device -> [images, features, hidden] (a fresh tensor)."""
        if pixels.shape[1:] != self.pixels.shape[1:]:  # not the size the graphs were captured for
            return self.model.encode_images(pixels)
        top = self.BUCKETS[-1]
        chunks = []
        for start in range(0, pixels.shape[0], top):
            part = pixels[start : start + top]
            count = next(b for b in self.BUCKETS if b >= part.shape[0])
            self.pixels[: part.shape[0]].copy_(part)
            graph, features = self.graphs[count]
            graph.replay()
            chunks.append(features[: part.shape[0]].clone())  # the next replay overwrites the output
        return torch.cat(chunks)
