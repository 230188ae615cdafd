"""The PyTorch paged backend's two decode paths agree, and the block manager keeps sequences in runs."""
import pytest
import torch

from vllm_utils.attention.metadata import AttentionMetadata
from vllm_utils.attention.torch_backend import TorchPagedAttention
from vllm_utils.engine.block_manager import BlockManager
from vllm_utils.engine.step_inputs import _run_start
from vllm_utils.engine.sequence import Sequence
from vllm_utils.sampling_params import SamplingParams


@pytest.mark.parametrize("window", [None, 5])
def test_reading_runs_in_place_equals_gathering(window):
    torch.manual_seed(0)
    block_size, heads, kv_heads, dim = 4, 8, 2, 16
    k_cache = torch.randn(40, block_size, kv_heads, dim)
    v_cache = torch.randn_like(k_cache)
    tables = [[3, 4, 5], [10, 2, 7], [20, 21, 22]]  # runs, a scattered one, a run read partially
    context_lens = torch.tensor([12, 9, 10])
    q = torch.randn(3, heads, dim)
    meta = AttentionMetadata(False, torch.zeros(3, dtype=torch.long), block_tables=torch.tensor(tables, dtype=torch.int32),
                             context_lens=context_lens, run_starts=[_run_start(t) for t in tables])
    assert meta.run_starts == [3, -1, 20]
    backend = TorchPagedAttention(reads_runs=True)
    in_place = backend.decode_runs(q, k_cache, v_cache, meta, dim**-0.5, window)
    gathered = backend.decode(q, k_cache, v_cache, meta.block_tables, context_lens, dim**-0.5, window)
    torch.testing.assert_close(in_place, gathered)
    # each against attention over exactly the keys it may see
    for i, (table, length) in enumerate(zip(tables, context_lens.tolist())):
        keys = slice(length - min(length, window or length), length)
        k, v = (c[table].flatten(0, 1)[keys].repeat_interleave(heads // kv_heads, 1) for c in (k_cache, v_cache))
        expected = torch.softmax(torch.einsum("hd,thd->ht", q[i], k) * dim**-0.5, -1)
        torch.testing.assert_close(gathered[i], torch.einsum("ht,thd->hd", expected, v))


def test_prefill_with_a_window_sees_only_the_last_positions():
    torch.manual_seed(0)
    tokens, heads, dim, window = 9, 2, 8, 3
    q, k, v = torch.randn(3, tokens, heads, dim).unbind(0)
    out = TorchPagedAttention().prefill(q, k, v, [tokens], dim**-0.5, window)
    for t in range(tokens):
        keys = slice(max(0, t - window + 1), t + 1)
        weights = torch.softmax(torch.einsum("hd,thd->ht", q[t], k[keys]) * dim**-0.5, -1)
        torch.testing.assert_close(out[t], torch.einsum("ht,thd->hd", weights, v[keys]))


def test_sequences_grow_in_place_and_every_block_comes_back():
    manager = BlockManager(num_blocks=64, block_size=4)
    seqs = [Sequence(list(range(10)), SamplingParams(max_tokens=12)) for _ in range(3)]
    for seq in seqs:
        manager.allocate(seq)
    for _ in range(12):  # decode steps: each sequence grows by a token
        for seq in seqs:
            seq.token_ids.append(0)
            manager.append(seq)
    assert all(_run_start(s.block_table) >= 0 for s in seqs)  # each still one run of blocks
    assert len({b for s in seqs for b in s.block_table}) == sum(len(s.block_table) for s in seqs)
    for seq in seqs:
        manager.free(seq)
    assert manager.num_free == 64 and (manager.claimed_by == -1).all()


def test_placement_never_refuses_a_free_block():
    manager = BlockManager(num_blocks=6, block_size=1)
    a, b = (Sequence([0, 0], SamplingParams(max_tokens=3)) for _ in range(2))
    manager.allocate(a)  # wants 5 blocks: takes 0-1 and claims 2-4
    assert a.block_table == [0, 1] and list(manager.claimed_by[2:5]) == [a.seq_id] * 3
    manager.allocate(b)  # no unclaimed run of 2 is left, but free blocks are: it gets claimed ones
    assert b.block_table == [2, 3] and manager.num_free == 2
