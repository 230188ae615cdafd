"""vLLM's encoder cache: the multimodal embeddings of recent prompts, kept under the content hash of their items.

With prefix caching, a prompt's cached prefix often ends inside its picture: the picture's last positions share a
block with the question after them, and that block differs from question to question. The prompt still needs the
embeddings of those last positions, and they come from here instead of a second pass of the vision tower: the
embeddings its cached blocks were computed from. Prompts that share no cached block encode their items themselves."""
from collections import OrderedDict

import torch


ENCODER_CACHE_ROWS = 4096  # the most rows kept: 32 MiB at a hidden size of 4096 in bf16


class EncoderCache:
    """Embeddings by key, at most `budget_rows` rows in all (the newest entry is kept whatever its size); the least
    recently used go first."""

    def __init__(self, budget_rows: int) -> None:
        self.budget_rows = budget_rows
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.rows = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self.entries

    def get(self, key: bytes) -> torch.Tensor:
        self.entries.move_to_end(key)
        return self.entries[key]

    def put(self, key: bytes, embeds: torch.Tensor) -> None:
        if key in self.entries:
            self.rows -= self.entries.pop(key).shape[0]
        while self.entries and self.rows + embeds.shape[0] > self.budget_rows:
            self.rows -= self.entries.popitem(last=False)[1].shape[0]
        self.entries[key] = embeds.clone()  # its own rows: a view would hold the whole step's encoder output
        self.rows += embeds.shape[0]

    def clear(self) -> None:
        self.entries.clear()
        self.rows = 0
