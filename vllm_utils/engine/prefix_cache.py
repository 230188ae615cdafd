"""Automatic prefix caching, as vLLM's: a full KV block whose keys and values are computed (or are being computed in
the step being scheduled) is kept under a hash of everything that decides them (the tokens up to its end and the multimodal items whose positions lie in it), so that
a later prompt starting the same way reads those blocks instead of computing them again. Blocks no sequence holds
stay cached until their room is needed, the least recently freed first (a sequence's last blocks before its first).

An item's hash is of its content (an image's pixels, a video's processed tensors), never of its placeholder
tokens: the same prompt with another picture misses from the picture's first block on."""
import hashlib
from bisect import bisect_right
from collections import OrderedDict
from itertools import accumulate

import numpy as np
import torch
from PIL import Image

from vllm_utils.engine.sequence import Sequence
from vllm_utils.multimodal.inputs import MultiModalInputs

BlockHash = bytes


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part)
    return h.digest()


def image_digest(image: Image.Image) -> bytes:
    return _digest(f"{image.mode}{image.size}".encode(), image.tobytes())


def tensors_digest(mm_inputs: MultiModalInputs) -> bytes:
    parts = []
    for name in sorted(mm_inputs):
        t = mm_inputs[name].detach().cpu().contiguous()
        parts += [f"{name}{t.dtype}{tuple(t.shape)}".encode(), t.view(-1).view(torch.uint8).numpy().tobytes()]
    return _digest(*parts)


def item_hashes(item_positions: list[int], mm_inputs: MultiModalInputs, images: list[Image.Image] | None,
                videos: list | None) -> list[tuple[int, bytes]]:
    """(positions, content hash) of each item of a prompt, in prompt order: each image's own where the items are
    exactly the given images; otherwise one hash of all the prompt's tensors for all its positions (exact, only
    shared less)."""
    if images and not videos and len(item_positions) == len(images):
        return [(n, image_digest(image)) for n, image in zip(item_positions, images)]
    return [(sum(item_positions), tensors_digest(mm_inputs))]


def items_key(hashes: list[tuple[int, bytes]]) -> bytes:
    """One hash of all of a prompt's items (the encoder cache's key for their embeddings)."""
    return _digest(*(n.to_bytes(8, "little") + digest for n, digest in hashes))


class PrefixCache:
    """The hashes of a sequence's full blocks, and the blocks the cache holds under each hash (the block manager
    owns the blocks; this owns which of them are cached and which the LRU order evicts first)."""

    def __init__(self, num_blocks: int, block_size: int, mm_token_ids: list[int]) -> None:
        self.block_size = block_size
        self.mm_token_ids = set(mm_token_ids)
        self.by_hash: dict[BlockHash, int] = {}
        self.hash_of: dict[int, BlockHash] = {}
        self.is_cached = np.zeros(num_blocks, dtype=bool)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks no sequence holds, oldest first

    def block_hashes(self, seq: Sequence, count: int) -> list[BlockHash]:
        """The hashes of `seq`'s first `count` full blocks (each chained to the one before it), worked out once."""
        hashes, size = seq.block_hashes, self.block_size
        if len(hashes) >= count:
            return hashes[:count]
        is_mm = [t in self.mm_token_ids for t in seq.token_ids[: seq.text_from]]
        item_ends = list(accumulate(n for n, _ in seq.mm_hashes or []))
        mm_before = sum(is_mm[: len(hashes) * size])
        for i in range(len(hashes), count):
            flags = is_mm[i * size : (i + 1) * size]
            flags += [False] * (size - len(flags))  # generated tokens are text: a chat's next prompt holds them so
            parts = [hashes[-1] if hashes else b"", np.asarray(seq.token_ids[i * size : (i + 1) * size],
                                                               dtype=np.int64).tobytes(), bytes(flags)]
            if any(flags):
                first = bisect_right(item_ends, mm_before)
                last = bisect_right(item_ends, mm_before + sum(flags) - 1)
                parts += [digest for _, digest in seq.mm_hashes[first : last + 1]]
                mm_before += sum(flags)
            hashes.append(_digest(*parts))
        return hashes[:count]

    def lookup(self, seq: Sequence, max_tokens: int) -> list[int]:
        """The cached blocks of `seq`'s longest cached prefix of at most `max_tokens` tokens."""
        blocks = []
        for block_hash in self.block_hashes(seq, max_tokens // self.block_size):
            block = self.by_hash.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def register(self, seq: Sequence, upto: int) -> None:
        """Caches `seq`'s full blocks before token `upto`, keeping the block that holds a hash already where two
        hold the same."""
        count = upto // self.block_size
        if count <= seq.num_registered_blocks:  # most steps (a decode inside a block) complete none
            return
        for i, block_hash in enumerate(self.block_hashes(seq, count)[seq.num_registered_blocks :],
                                       seq.num_registered_blocks):
            block = seq.block_table[i]
            if block_hash not in self.by_hash and not self.is_cached[block]:
                self.by_hash[block_hash], self.hash_of[block] = block, block_hash
                self.is_cached[block] = True
        seq.num_registered_blocks = count

    def evict(self, count: int) -> None:
        """Forgets the `count` least recently freed cached blocks (they become plain free blocks)."""
        for _ in range(min(count, len(self.evictable))):
            block, _ = self.evictable.popitem(last=False)
            del self.by_hash[self.hash_of.pop(block)]
            self.is_cached[block] = False
