"""Graph mode: the decode step (model + LM head) captured as CUDA graphs, one per batch-size bucket,
over static input buffers; likewise the prefill of one prompt per length bucket, and the vision tower.
A batch is padded up to its bucket; padded rows write their K/V into a scratch block that no sequence
owns."""
from typing import Callable, TypeVar

import torch
from torch import nn
from tqdm import tqdm

from vllm_utils.attention.backend import AttentionMetadata
from vllm_utils.devices import pinned_for
from vllm_utils.layers.parallel import tp_rank


Out = TypeVar("Out")


@torch.inference_mode()
def capture_largest_first(sizes: list[int], step: Callable[[int], Out],
                          what: str) -> dict[int, tuple[torch.cuda.CUDAGraph, Out]]:
    """A CUDA graph of `step(size)` for each size, with its outputs (static tensors that each replay rewrites).
    Each step runs once before its capture, so lazy initialisation happens outside it; the largest is captured
    first, and the smaller ones reuse its memory pool. `what` names the sizes on the progress bar."""
    graphs, pool = {}, None
    bar = tqdm(sorted(sizes, reverse=True), desc=f"Capturing CUDA graphs ({what})", unit="graph",
               disable=tp_rank() != 0)
    for size in bar:
        step(size)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool):
            out = step(size)
        pool = graph.pool()
        graphs[size] = (graph, out)
    torch.cuda.synchronize()
    return graphs


def batch_buckets(max_batch: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch + 16, 16)) if max_batch > 8 else small + [max_batch]


class DecodeGraphs:
    def __init__(self, model: nn.Module, max_batch: int, max_blocks_per_seq: int, scratch_block: int,
                 block_size: int, device: torch.device, capture: bool = True) -> None:
        """`capture=False` runs the same padded steps eagerly (for tests)."""
        self.model = model
        self.buckets = batch_buckets(max_batch)
        top = self.buckets[-1]
        self.scratch_block = scratch_block
        # rows: token ids, positions, cache slots, context lengths; a padded row is one cached token in the
        # scratch block. Inputs go host -> pinned staging -> these buffers in two copies per step.
        self.padding = torch.tensor([0, 0, scratch_block * block_size, 1])
        self.rows_host = pinned_for(self.padding[:, None].repeat(1, top), device)
        self.tables_host = pinned_for(torch.full((top, max_blocks_per_seq), scratch_block, dtype=torch.int32), device)
        self.rows = self.rows_host.to(device)
        self.tables = self.tables_host.to(device)
        self.graphs = capture_largest_first(self.buckets, self._step, "decode batch sizes") if capture else {}

    def _step(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[:, :batch]
        meta = AttentionMetadata(False, rows[2], block_tables=self.tables[:batch], context_lens=rows[3])
        logits = self.model.compute_logits(self.model(rows[0], rows[1], meta))
        return logits, logits.argmax(dim=-1)

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
        if batch in self.graphs:
            graph, (logits, greedy) = self.graphs[batch]
            graph.replay()
        else:  # not captured: the same padded step, eagerly
            logits, greedy = self._step(batch)
        return logits[:n], greedy[:n]


def prefill_buckets(max_tokens: int) -> list[int]:
    """Prompt lengths a prefill graph is captured for: every 64 tokens up to 512, then every 128."""
    steps = list(range(64, 513, 64)) + list(range(640, max(max_tokens, 640) + 128, 128))
    return [b for b in steps if b < max_tokens] + [next(b for b in steps if b >= max_tokens)]


class PrefillGraphs:
    """The language model's prefill of one prompt (up to `max_tokens`), captured per length bucket, so
    that TTFT does not depend on how fast the host launches ~500 kernels. A prompt is padded to its
    bucket; padded rows come after the real ones, write their K/V into the scratch slot, and being
    later in a causal prompt, change nothing the real rows see. Image features are copied into a static
    buffer that the model gathers from. `capture=False` runs the same padded step eagerly (for tests)."""

    def __init__(self, model: nn.Module, max_tokens: int, scratch_slot: int, hidden: int, dtype: torch.dtype,
                 device: torch.device, capture: bool = True) -> None:
        self.model = model
        self.buckets = prefill_buckets(max_tokens)
        top = self.buckets[-1]
        # rows: token ids, positions, cache slots; then the image mask and the row whose logits we want
        self.padding = torch.tensor([0, 0, scratch_slot])
        self.rows_host = pinned_for(self.padding[:, None].repeat(1, top), device)
        self.mask_host = pinned_for(torch.zeros(top, dtype=torch.bool), device)
        self.rows, self.image_mask = self.rows_host.to(device), self.mask_host.to(device)
        self.last = torch.zeros(1, dtype=torch.long, device=device)
        self.image_embeds = torch.zeros(top, hidden, dtype=dtype, device=device)
        self.graphs = capture_largest_first(self.buckets, self._step, "prefill lengths") if capture else {}

    def _step(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[:, :length]
        meta = AttentionMetadata(True, rows[2], seq_lens=[length])
        hidden = self.model(rows[0], rows[1], meta, self.image_embeds, self.image_mask[:length], keep=self.last)
        logits = self.model.compute_logits(hidden)
        return logits, logits.argmax(dim=-1)

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def run(self, rows: torch.Tensor, image_mask: torch.Tensor,
            image_embeds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [3, n] and image_mask [n] on the host, image_embeds [images * features, hidden] on the device.
        Returns logits [1, vocab] and their argmax [1]."""
        n = rows.shape[1]
        length = next(b for b in self.buckets if b >= n)
        self.rows_host[:, :n] = rows
        self.rows_host[:, n:length] = self.padding[:, None]
        self.mask_host[:n] = image_mask
        self.mask_host[n:length] = False
        self.rows[:, :length].copy_(self.rows_host[:, :length], non_blocking=True)
        self.image_mask[:length].copy_(self.mask_host[:length], non_blocking=True)
        self.last.fill_(n - 1)
        if image_embeds is not None:
            self.image_embeds[: image_embeds.shape[0]].copy_(image_embeds)
        if length in self.graphs:
            graph, (logits, greedy) = self.graphs[length]
            graph.replay()
            return logits, greedy
        return self._step(length)  # not captured: the same padded step, eagerly


class VisionGraphs:
    """The vision tower + projector captured for 1, 2, 4 and 8 images (every image has the processor's
    fixed size, so shapes are static): prefill of an image prompt launches one graph instead of ~300
    kernels from Python. More images run in chunks of 8."""

    BUCKETS = (1, 2, 4, 8)

    def __init__(self, model: nn.Module, image_shape: tuple[int, int, int], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model = model
        self.pixels = torch.zeros(self.BUCKETS[-1], *image_shape, dtype=dtype, device=device)
        self.graphs = capture_largest_first(list(self.BUCKETS), lambda n: self.model.encode_images(self.pixels[:n]),
                                            "image counts")

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
