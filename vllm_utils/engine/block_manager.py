"""Hands out the fixed-size blocks of the paged KV cache to sequences.

Placement keeps each sequence's blocks in one run where it can: a new sequence takes the lowest run of
free blocks long enough for its prompt *and* the tokens it may still generate, and softly claims the tail
of that run; its later blocks come from that tail. Attention backends that can read a run as a plain
view of the cache (the PyTorch one on CPU) then skip gathering it. Any free block can still go to any
sequence when runs are scarce: placement is a preference, never a reason to refuse.

Models with a recurrent state (linear attention) also take one state slot per sequence, with its blocks, from
`num_state_slots` (a running sequence's slot is in `seq.state_slot`)."""
import numpy as np

from vllm_utils.engine.sequence import Sequence

UNCLAIMED = -1


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_state_slots: int = 0) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_state_slots = num_state_slots
        self.free_state_slots = list(range(num_state_slots - 1, -1, -1))  # popped lowest first
        self.is_free = np.ones(num_blocks, dtype=bool)
        self.claimed_by = np.full(num_blocks, UNCLAIMED, dtype=np.int64)  # soft reservations, by seq id
        self.num_free = num_blocks

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def can_allocate(self, seq: Sequence) -> bool:
        has_slot = not self.num_state_slots or bool(self.free_state_slots)
        return seq.num_blocks(self.block_size) <= self.num_free and has_slot

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table
        if self.num_state_slots:
            seq.state_slot = self.free_state_slots.pop()
        needed = seq.num_blocks(self.block_size)
        final_len = len(seq) + max(0, seq.max_output - seq.num_output_tokens)
        wanted = -(-final_len // self.block_size)
        open_blocks = self.is_free & (self.claimed_by == UNCLAIMED)
        start = self._first_run(open_blocks, wanted)
        if start is not None:  # room to grow in place: claim the tail
            self.claimed_by[start + needed : start + wanted] = seq.seq_id
        else:
            start = self._first_run(open_blocks, needed)
            if start is None:
                start = self._first_run(self.is_free, needed)
        blocks = list(range(start, start + needed)) if start is not None else \
            np.flatnonzero(self.is_free)[:needed].tolist()
        self._take(blocks)
        seq.block_table = blocks

    def free(self, seq: Sequence) -> None:
        if seq.state_slot is not None:
            self.free_state_slots.append(seq.state_slot)
            seq.state_slot = None
        self.is_free[seq.block_table] = True
        self.num_free += len(seq.block_table)
        self.claimed_by[self.claimed_by == seq.seq_id] = UNCLAIMED
        seq.block_table = []

    def can_append(self, seq: Sequence) -> bool:
        """Room for the K/V of the sequence's newest token (written by the coming decode step)."""
        return seq.num_blocks(self.block_size) - len(seq.block_table) <= self.num_free

    def append(self, seq: Sequence) -> None:
        while len(seq.block_table) < seq.num_blocks(self.block_size):
            following = seq.block_table[-1] + 1 if seq.block_table else self.num_blocks
            if following < self.num_blocks and self.is_free[following] and \
                    self.claimed_by[following] in (UNCLAIMED, seq.seq_id):
                block = following
            else:
                open_blocks = np.flatnonzero(self.is_free & (self.claimed_by == UNCLAIMED))
                block = int(open_blocks[0]) if open_blocks.size else int(np.flatnonzero(self.is_free)[0])
            self._take([block])
            seq.block_table.append(block)

    def _take(self, blocks: list[int]) -> None:
        self.is_free[blocks] = False
        self.claimed_by[blocks] = UNCLAIMED
        self.num_free -= len(blocks)

    @staticmethod
    def _first_run(mask: np.ndarray, length: int) -> int | None:
        """Lowest index where `length` consecutive True values of `mask` begin."""
        if length == 0 or length > mask.size:
            return None
        counts = np.concatenate(([0], np.cumsum(mask, dtype=np.int64)))
        starts = np.flatnonzero(counts[length:] - counts[:-length] == length)
        return int(starts[0]) if starts.size else None
