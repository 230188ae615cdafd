"""The gated delta rule (linear attention's recurrence) against transformers' own reference functions, and the
op's batched forms against one sequence at a time."""
import pytest
import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import (torch_chunk_gated_delta_rule,
                                                          torch_recurrent_gated_delta_rule)

from vllm_utils.layers.delta_rule import GatedDeltaRule, chunked_delta_rule, recurrent_delta_rule


def _inputs(tokens: int, seed: int, key_heads: int = 2, value_heads: int = 4, dim: int = 16):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, tokens, key_heads, dim, generator=gen).unbind(0)
    v = torch.randn(tokens, value_heads, dim + 8, generator=gen)
    g = -torch.rand(tokens, value_heads, generator=gen) * 2  # log decays <= 0
    beta = torch.rand(tokens, value_heads, generator=gen)
    state = torch.randn(value_heads, dim, dim + 8, generator=gen) * 0.1
    return q, k, v, g, beta, state


@pytest.mark.parametrize("tokens", [1, 7, 64, 150])  # within one chunk, exactly one, several with a partial one
def test_a_prompt_equals_transformers_chunked_and_recurrent_forms(tokens):
    q, k, v, g, beta, state = _inputs(tokens, tokens)
    ours, ours_state = chunked_delta_rule(q, k, v, g, beta, state)
    batch = [x[None] for x in (q, k, v, g, beta)]
    for reference in (torch_chunk_gated_delta_rule, torch_recurrent_gated_delta_rule):
        theirs, theirs_state = reference(*batch[:3], g=batch[3], beta=batch[4], initial_state=state[None],
                                         output_final_state=True, use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(ours, theirs[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours_state, theirs_state[0], rtol=1e-4, atol=1e-4)


def test_decode_steps_continue_a_prompt_as_one_longer_prompt():
    q, k, v, g, beta, state = _inputs(40, 0)
    whole, whole_state = chunked_delta_rule(q, k, v, g, beta, state)
    _, carried = chunked_delta_rule(q[:30], k[:30], v[:30], g[:30], beta[:30], state)
    for t in range(30, 40):
        out, carried = recurrent_delta_rule(q[t : t + 1], k[t : t + 1], v[t : t + 1], g[t : t + 1],
                                            beta[t : t + 1], carried[None])
        carried = carried[0]
        torch.testing.assert_close(out[0], whole[t], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(carried, whole_state, rtol=1e-4, atol=1e-4)


def test_the_op_reads_and_writes_each_sequences_own_slot():
    rule = GatedDeltaRule()
    pool = torch.zeros(5, 4, 16, 24)
    prompts = [_inputs(n, n) for n in (9, 70)]
    for (*_, state), slot in zip(prompts, (3, 1)):
        pool[slot] = state
    packed = [torch.cat([p[i] for p in prompts]) for i in range(5)]
    out = rule(*packed, pool, torch.tensor([3, 1]), [9, 70])
    for (q, k, v, g, beta, state), slot, rows in zip(prompts, (3, 1), (slice(0, 9), slice(9, 79))):
        expected, final = chunked_delta_rule(q, k, v, g, beta, state)
        torch.testing.assert_close(out[rows], expected)
        torch.testing.assert_close(pool[slot], final)
    assert not pool[[0, 2, 4]].any()  # nobody else's slot was touched
    step = _inputs(2, 5)
    before = pool.clone()
    out = rule(*step[:5], pool, torch.tensor([1, 3]), None)
    expected, states = recurrent_delta_rule(*step[:5], before[[1, 3]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(pool[[1, 3]], states)


def test_the_cpu_kernels_decode_step_equals_the_native_form():
    """Our C step on a pool of states: grouped value heads, a value dim that is not a multiple of 16, only the slots
    of the step changed."""
    from vllm_utils.kernels import cpu

    if cpu.unavailable_reason():
        pytest.skip(f"no CPU kernels here: {cpu.unavailable_reason()}")
    gen = torch.Generator().manual_seed(3)
    seqs, key_heads, value_heads, key_dim, value_dim = 3, 2, 6, 32, 40
    mixed = torch.randn(seqs, 2 * key_heads * key_dim + value_heads * value_dim, generator=gen)
    q, k, v = mixed.split([key_heads * key_dim, key_heads * key_dim, value_heads * value_dim], dim=-1)
    q, k = q.view(seqs, key_heads, key_dim), k.view(seqs, key_heads, key_dim)
    v = v.view(seqs, value_heads, value_dim)
    g, beta = -torch.rand(seqs, value_heads, generator=gen), torch.rand(seqs, value_heads, generator=gen)
    pool = torch.randn(5, value_heads, key_dim, value_dim, generator=gen) * 0.1
    before, slots = pool.clone(), torch.tensor([4, 0, 2])
    assert cpu.supports_delta_rule(pool)
    out = cpu.delta_rule_step_(q, k, v, g, beta, pool, slots)
    expected, states = recurrent_delta_rule(q, k, v, g, beta, before[slots])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool[slots], states, rtol=1e-5, atol=1e-5)
    assert torch.equal(pool[[1, 3]], before[[1, 3]])
