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


def _exact(q, k, v, visible: list[range], scale: float) -> torch.Tensor:
    """Each query's attention over exactly the keys `visible[t]`, one at a time."""
    group = q.shape[1] // k.shape[1]
    rows = []
    for t, keys in enumerate(visible):
        kt, vt = (x[list(keys)].repeat_interleave(group, 1) for x in (k, v))
        weights = torch.softmax(torch.einsum("hd,thd->ht", q[t], kt) * scale, -1)
        rows.append(torch.einsum("ht,thd->hd", weights, vt))
    return torch.stack(rows)


def _key_ends(tokens: int, runs: list[tuple[int, int]]) -> torch.Tensor:
    ends = torch.arange(1, tokens + 1, dtype=torch.int32)
    for first, last in runs:
        ends[first:last] = last
    return ends


@pytest.mark.parametrize("window", [None, 4])
def test_an_images_positions_see_each_other_and_the_rest_is_causal(window):
    """Two prompts packed: queries in a run of placeholders see the whole run (later ones too), the others
    causally; a window still bounds what each sees from behind."""
    torch.manual_seed(0)
    heads, kv_heads, dim = 4, 2, 8
    lengths, runs = [12, 9], [[(2, 7), (8, 10)], [(0, 3)]]
    q = torch.randn(sum(lengths), heads, dim)
    k, v = torch.randn(2, sum(lengths), kv_heads, dim).unbind(0)
    ends = torch.cat([_key_ends(n, r) for n, r in zip(lengths, runs)])
    out = TorchPagedAttention().prefill(q, k, v, lengths, dim**-0.5, window, ends)
    start = 0
    for n, r in zip(lengths, runs):
        visible = [range(max(0, t - window + 1) if window else 0, int(e)) for t, e in enumerate(_key_ends(n, r))]
        s = slice(start, start + n)
        torch.testing.assert_close(out[s], _exact(q[s], k[s], v[s], visible, dim**-0.5))
        start += n


@pytest.mark.parametrize("window", [None, 5])
def test_chunks_read_from_the_cache_equal_the_whole_prompt_with_an_image(window):
    """A prompt prefilled in chunks that end at a run's edges equals it prefilled whole."""
    torch.manual_seed(0)
    block_size, heads, kv_heads, dim, tokens = 4, 4, 2, 8, 21
    runs, chunks = [(3, 11), (13, 19)], [3, 8, 2, 6, 2]  # each run inside one chunk
    q = torch.randn(tokens, heads, dim)
    k, v = torch.randn(2, tokens, kv_heads, dim).unbind(0)
    ends = _key_ends(tokens, runs)
    backend = TorchPagedAttention()
    whole = backend.prefill(q, k, v, [tokens], dim**-0.5, window, ends)
    table = [7, 2, 9, 4, 11, 5]  # scattered blocks
    k_cache = torch.zeros(12, block_size, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(tokens)])
    start = 0
    for n in chunks:
        s = slice(start, start + n)
        backend.store_kv(k[s], v[s], k_cache, v_cache, slots[s])
        meta = AttentionMetadata(True, slots[s], seq_lens=[n], cached_lens=[start],
                                 block_tables=torch.tensor([table], dtype=torch.int32), key_ends=ends[s])
        torch.testing.assert_close(backend.attend(q[s], k[s], v[s], k_cache, v_cache, meta, dim**-0.5, window),
                                   whole[s])
        start += n


def test_the_cpu_kernels_backend_equals_the_pytorch_one_on_an_image():
    from vllm_utils.attention.cpu_backend import CpuPagedAttention
    from vllm_utils.kernels import cpu

    torch.manual_seed(0)
    lengths, runs, heads, kv_heads, dim = [100, 70], [[(5, 69), (80, 96)], [(60, 70)]], 4, 2, 64
    q = torch.randn(sum(lengths), heads, dim).bfloat16()
    k, v = torch.randn(2, sum(lengths), kv_heads, dim).bfloat16().unbind(0)
    if not cpu.supports_prefill_attention(q, k, v):
        pytest.skip(f"no CPU kernels here: {cpu.unavailable_reason()}")
    ends = torch.cat([_key_ends(n, r) for n, r in zip(lengths, runs)])
    for window in (None, 30):
        ours = CpuPagedAttention().prefill(q, k, v, lengths, dim**-0.5, window, ends)
        native = TorchPagedAttention().prefill(q.double(), k.double(), v.double(), lengths, dim**-0.5, window, ends)
        causal = TorchPagedAttention().prefill(q.double(), k.double(), v.double(), lengths, dim**-0.5, window)
        torch.testing.assert_close(ours.double(), native, rtol=2**-6, atol=2**-6)
        assert not torch.allclose(ours.double(), causal, rtol=2**-6, atol=2**-6)  # the runs did change it


def test_chunks_never_split_an_images_positions():
    """With a budget smaller than a prompt, a chunk stops before an image it cannot hold whole, and an image
    longer than the budget takes a chunk of its own."""
    from vllm_utils.engine.scheduler import Scheduler

    image = 99
    prompt = [1, 2, 3] + [image] * 6 + [4, 5] + [image] * 3 + [6]
    seq = Sequence(prompt, SamplingParams(max_tokens=1))
    scheduler = Scheduler(BlockManager(num_blocks=16, block_size=4), max_num_seqs=4, max_num_batched_tokens=5,
                          max_model_len=64, eos_token_ids=[], whole_runs={image})
    scheduler.add(seq)
    chunks = []
    while seq.num_computed < len(prompt):
        step = scheduler.schedule()
        chunks.append(step.num_tokens[0])
        seq.num_computed += step.num_tokens[0]
    assert chunks == [3, 6, 5, 1]
    assert seq.mm_runs({image}) == [(3, 9), (11, 14)]
