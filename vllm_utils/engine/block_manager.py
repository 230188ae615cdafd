"""Hands out the fixed-size blocks of the paged KV cache to sequences.

Placement keeps each sequence's blocks in one run where it can: a new sequence takes the lowest run of
free blocks long enough for its prompt *and* the tokens it may still generate, and softly claims the tail
of that run; its later blocks come from that tail. Attention backends that can read a run as a plain
view of the cache (the PyTorch one on CPU) then skip gathering it. Any free block can still go to any
sequence when runs are scarce: placement is a preference, never a reason to refuse.

With prefix caching (engine/prefix_cache.py) a block may be held by several sequences (counted in `ref_counts`),
and a freed block whose keys and values are cached stays out of the open blocks until the cache gives it up.

Models with a recurrent state (linear attention) also take one state slot per sequence, with its blocks, from
`num_state_slots` (a running sequence's slot is in `seq.state_slot`)."""
import numpy as np

from vllm_utils.engine.prefix_cache import PrefixCache
from vllm_utils.engine.sequence import Sequence

UNCLAIMED = -1


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_state_slots: int = 0,
                 prefix_cache: PrefixCache | None = None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_state_slots = num_state_slots
        self.free_state_slots = list(range(num_state_slots - 1, -1, -1))  # popped lowest first
        self.is_free = np.ones(num_blocks, dtype=bool)
        self.ref_counts = np.zeros(num_blocks, dtype=np.int64)
        self.claimed_by = np.full(num_blocks, UNCLAIMED, dtype=np.int64)  # soft reservations, by seq id
        self.num_free = num_blocks
        self.cache = prefix_cache

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def cached_prefix(self, seq: Sequence, max_tokens: int) -> list[int]:
        """The blocks of `seq`'s longest prefix of at most `max_tokens` tokens whose keys and values are cached."""
        return self.cache.lookup(seq, max_tokens) if self.cache is not None else []

    def can_allocate(self, seq: Sequence, hits: list[int] = ()) -> bool:
        """Room for `seq`'s blocks, the cached ones `hits` shared (see `cached_prefix`)."""
        has_slot = not self.num_state_slots or bool(self.free_state_slots)
        taken_from_free = seq.num_blocks(self.block_size) - sum(self.ref_counts[b] > 0 for b in hits)
        return taken_from_free <= self.num_free and has_slot

    def allocate(self, seq: Sequence, hits: list[int] = ()) -> None:
        """Gives `seq` the cached blocks `hits` for its first tokens (their keys and values computed: it starts
        after them) and new blocks for the rest."""
        assert not seq.block_table
        if self.num_state_slots:
            seq.state_slot = self.free_state_slots.pop()
        for block in hits:
            if self.ref_counts[block] == 0:
                self.is_free[block] = False
                self.num_free -= 1
                del self.cache.evictable[block]
            self.ref_counts[block] += 1
        needed = seq.num_blocks(self.block_size) - len(hits)
        final_len = len(seq) + max(0, seq.max_output - seq.num_output_tokens)
        wanted = -(-final_len // self.block_size) - len(hits)
        uncached = self._uncached_free(needed)
        open_blocks = uncached & (self.claimed_by == UNCLAIMED)
        start = self._first_run(open_blocks, wanted)
        if start is not None:  # room to grow in place: claim the tail
            self.claimed_by[start + needed : start + wanted] = seq.seq_id
        else:
            start = self._first_run(open_blocks, needed)
            if start is None:
                start = self._first_run(uncached, needed)
        blocks = list(range(start, start + needed)) if start is not None else \
            np.flatnonzero(uncached)[:needed].tolist()
        self._take(blocks)
        seq.block_table = list(hits) + blocks
        seq.num_computed = seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_registered_blocks = len(hits)

    def free(self, seq: Sequence) -> None:
        """Gives back `seq`'s blocks and slot; cached blocks that no sequence holds stay cached, the last ones
        first in line to be evicted."""
        if seq.state_slot is not None:
            self.free_state_slots.append(seq.state_slot)
            seq.state_slot = None
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.is_free[block] = True
                self.num_free += 1
                if self.cache is not None and self.cache.is_cached[block]:
                    self.cache.evictable[block] = None
        self.claimed_by[self.claimed_by == seq.seq_id] = UNCLAIMED
        seq.block_table = []
        seq.num_registered_blocks = 0

    def cache_computed(self, seq: Sequence, upto: int) -> None:
        """Offers `seq`'s full blocks before token `upto` to the prefix cache (their keys and values computed by
        the step being scheduled, or before)."""
        if self.cache is not None:
            self.cache.register(seq, upto)

    def _uncached_free(self, count: int) -> np.ndarray:
        """The free blocks that hold nothing cached, at least `count` of them where the free blocks allow (the
        least recently freed cached blocks evicted to make up the difference)."""
        if self.cache is None:
            return self.is_free
        uncached = self.is_free & ~self.cache.is_cached
        missing = count - int(uncached.sum())
        if missing > 0:
            self.cache.evict(missing)
            uncached = self.is_free & ~self.cache.is_cached
        return uncached

    def can_append(self, seq: Sequence) -> bool:
        """Room for the K/V of the sequence's newest token (written by the coming decode step)."""
        return seq.num_blocks(self.block_size) - len(seq.block_table) <= self.num_free

    def append(self, seq: Sequence) -> None:
        while len(seq.block_table) < seq.num_blocks(self.block_size):
            uncached = self._uncached_free(1)
            following = seq.block_table[-1] + 1 if seq.block_table else self.num_blocks
            if following < self.num_blocks and uncached[following] and \
                    self.claimed_by[following] in (UNCLAIMED, seq.seq_id):
                block = following
            else:
                open_blocks = np.flatnonzero(uncached & (self.claimed_by == UNCLAIMED))
                block = int(open_blocks[0]) if open_blocks.size else int(np.flatnonzero(uncached)[0])
            self._take([block])
            seq.block_table.append(block)

    def _take(self, blocks: list[int]) -> None:
        self.is_free[blocks] = False
        self.ref_counts[blocks] = 1
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
