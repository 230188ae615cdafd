"""Graph mode: the decode step (model + LM head) captured as CUDA graphs, one per batch-size bucket,
over static input buffers; likewise the prefill of one prompt per length bucket, and the vision tower.
A batch is padded up to its bucket; padded rows write their K/V into a scratch block that no sequence
owns."""
from typing import Callable, TypeVar

import torch
from torch import nn
from tqdm import tqdm

from vllm_utils.attention.metadata import AttentionMetadata
from vllm_utils.engine.step_inputs import DecodeInputs, PrefillInputs
from vllm_utils.distributed import tp_rank
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.platforms.interface import Platform


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
    # the rows of the static input buffer, so that a step's inputs cross to the device in one copy
    TOKEN_IDS, POSITIONS, SLOTS, CONTEXT_LENS = range(4)

    def __init__(self, model: nn.Module, max_batch: int, max_blocks_per_seq: int, scratch_block: int,
                 block_size: int, platform: Platform, device: torch.device, capture: bool = True) -> None:
        """`capture=False` runs the same padded steps eagerly (for tests)."""
        self.model = model
        self.buckets = batch_buckets(max_batch)
        top = self.buckets[-1]
        self.scratch_block = scratch_block
        # a padded row: token 0 at position 0, one cached token, in the scratch block that no sequence owns.
        # Inputs go host -> staging (pinned on CUDA) -> these buffers in two copies per step.
        self.padding = torch.zeros(4, dtype=torch.long)
        self.padding[self.SLOTS], self.padding[self.CONTEXT_LENS] = scratch_block * block_size, 1
        self.rows_host = platform.host_staging(self.padding[:, None].repeat(1, top))
        self.tables_host = platform.host_staging(torch.full((top, max_blocks_per_seq), scratch_block, dtype=torch.int32))
        self.rows = self.rows_host.to(device)
        self.tables = self.tables_host.to(device)
        self.graphs = capture_largest_first(self.buckets, self._step, "decode batch sizes") if capture else {}

    def _step(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[:, :batch]
        meta = AttentionMetadata(False, rows[self.SLOTS], block_tables=self.tables[:batch],
                                 context_lens=rows[self.CONTEXT_LENS])
        logits = self.model.compute_logits(self.model(rows[self.TOKEN_IDS], rows[self.POSITIONS], meta))
        return logits, logits.argmax(dim=-1)

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def run(self, inputs: DecodeInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns logits and argmax [n] of the step's n sequences."""
        tables = inputs.block_tables
        n, width = tables.shape
        batch = next(b for b in self.buckets if b >= n)
        # the previous step's copies are done: its sampled tokens were read on the host
        for row, values in ((self.TOKEN_IDS, inputs.token_ids), (self.POSITIONS, inputs.positions),
                            (self.SLOTS, inputs.slots), (self.CONTEXT_LENS, inputs.context_lens)):
            self.rows_host[row, :n] = values
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

    TOKEN_IDS, POSITIONS, SLOTS = range(3)  # the rows of the static input buffer

    def __init__(self, model: nn.Module, max_tokens: int, scratch_slot: int, hidden: int, dtype: torch.dtype,
                 platform: Platform, device: torch.device, capture: bool = True) -> None:
        self.model = model
        self.buckets = prefill_buckets(max_tokens)
        top = self.buckets[-1]
        # a padded row: token 0 at position 0 writing into the scratch slot; then the multimodal mask, the
        # multimodal embeddings, and the row whose logits we want
        self.padding = torch.zeros(3, dtype=torch.long)
        self.padding[self.SLOTS] = scratch_slot
        self.rows_host = platform.host_staging(self.padding[:, None].repeat(1, top))
        self.mask_host = platform.host_staging(torch.zeros(top, dtype=torch.bool))
        self.rows, self.mm_mask = self.rows_host.to(device), self.mask_host.to(device)
        self.last = torch.zeros(1, dtype=torch.long, device=device)
        self.mm_embeds = torch.zeros(top, hidden, dtype=dtype, device=device)
        self.graphs = capture_largest_first(self.buckets, self._step, "prefill lengths") if capture else {}

    def _step(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[:, :length]
        meta = AttentionMetadata(True, rows[self.SLOTS], seq_lens=[length])
        hidden = self.model(rows[self.TOKEN_IDS], rows[self.POSITIONS], meta, self.mm_embeds, self.mm_mask[:length],
                            keep=self.last)
        logits = self.model.compute_logits(hidden)
        return logits, logits.argmax(dim=-1)

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def run(self, inputs: PrefillInputs, mm_embeds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt (on the host) and its multimodal embeddings [positions, hidden] (on the device).
        Returns logits [1, vocab] and their argmax [1]."""
        n = inputs.token_ids.shape[0]
        length = next(b for b in self.buckets if b >= n)
        for row, values in ((self.TOKEN_IDS, inputs.token_ids), (self.POSITIONS, inputs.positions),
                            (self.SLOTS, inputs.slots)):
            self.rows_host[row, :n] = values
        self.rows_host[:, n:length] = self.padding[:, None]
        self.mask_host[:n] = inputs.mm_mask
        self.mask_host[n:length] = False
        self.rows[:, :length].copy_(self.rows_host[:, :length], non_blocking=True)
        self.mm_mask[:length].copy_(self.mask_host[:length], non_blocking=True)
        self.last.fill_(n - 1)
        if mm_embeds is not None:
            self.mm_embeds[: mm_embeds.shape[0]].copy_(mm_embeds)
        if length in self.graphs:
            graph, (logits, greedy) = self.graphs[length]
            graph.replay()
            return logits, greedy
        return self._step(length)  # not captured: the same padded step, eagerly


class VisionGraphs:
    """The multimodal encoder captured for 1, 2, 4 and 8 items, for models whose items all have one shape
    (`static_mm_item`): the prefill of an image prompt launches one graph instead of hundreds of kernels from
    Python. More items run in chunks of 8; items of another shape run eagerly."""

    BUCKETS = (1, 2, 4, 8)

    def __init__(self, model: nn.Module, item: MultiModalInputs, dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        top = self.BUCKETS[-1]
        self.inputs = {k: torch.zeros(top, *v.shape[1:], dtype=dtype if v.is_floating_point() else v.dtype,
                                      device=device) for k, v in item.items()}
        self.graphs = capture_largest_first(
            list(self.BUCKETS), lambda n: self.model.encode_mm({k: v[:n] for k, v in self.inputs.items()}),
            "image counts")

    def encode(self, mm_inputs: MultiModalInputs) -> torch.Tensor:
        """Items on the device -> [positions, hidden] (a fresh tensor)."""
        if mm_inputs.keys() != self.inputs.keys() or any(
                v.shape[1:] != self.inputs[k].shape[1:] for k, v in mm_inputs.items()):
            return self.model.encode_mm(mm_inputs)
        top = self.BUCKETS[-1]
        count = next(iter(mm_inputs.values())).shape[0]
        chunks = []
        for start in range(0, count, top):
            part = min(top, count - start)
            bucket = next(b for b in self.BUCKETS if b >= part)
            for k, v in mm_inputs.items():
                self.inputs[k][:part].copy_(v[start : start + part])
            graph, features = self.graphs[bucket]
            graph.replay()
            rows = features.shape[0] // bucket  # positions per item
            chunks.append(features[: part * rows].clone())  # the next replay overwrites the output
        return torch.cat(chunks)
