"""Hands out the fixed-size blocks of the paged KV cache to sequences."""
from collections import deque

from vllm_utils.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def can_allocate(self, seq: Sequence) -> bool:
        return seq.num_blocks(self.block_size) <= len(self.free_blocks)

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table
        seq.block_table = [self.free_blocks.popleft() for _ in range(seq.num_blocks(self.block_size))]

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []

    def can_append(self, seq: Sequence) -> bool:
        """Room for the K/V of the sequence's newest token (written by the coming decode step)."""
        return seq.num_blocks(self.block_size) - len(seq.block_table) <= len(self.free_blocks)

    def append(self, seq: Sequence) -> None:
        while len(seq.block_table) < seq.num_blocks(self.block_size):
            seq.block_table.append(self.free_blocks.popleft())
