"""The Mixture-of-Experts layer (`layers/moe.py`) against a dense reference written here (every expert on every
token, masked by the routing): routing with and without renormalisation, several tokens on one expert and experts
no token chose, loading from fused tensors in either orientation and from per-expert ones, tensor-parallel shards
summing to the unsplit layer, and that the native form reads only the chosen experts' weights."""
import pytest
import torch
import torch.nn.functional as F

from vllm_utils.layers import moe
from vllm_utils.layers.moe import FusedMoE, SparseMoeBlock, route

EXPERTS, HIDDEN, INTER, TOP_K = 6, 16, 12, 2


def random_experts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused weights as transformers holds them: gate_up [experts, 2 * inter, hidden], down [experts, hidden, inter]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g) * HIDDEN**-0.5,
            torch.randn(EXPERTS, HIDDEN, INTER, generator=g) * INTER**-0.5)


def dense_reference(x, logits, gate_up, down, renormalize: bool) -> torch.Tensor:
    """Every expert on every token, weighted by its routing probability where among the token's top k, else 0."""
    probs = torch.softmax(logits, dim=-1)
    top = probs.topk(TOP_K, dim=-1)
    mask = torch.zeros_like(probs).scatter(1, top.indices, 1.0)
    weights = probs * mask
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    gate, up = torch.einsum("th,eih->tei", x, gate_up).chunk(2, dim=-1)
    outs = torch.einsum("tei,ehi->teh", F.silu(gate) * up, down)
    return (outs * weights[..., None]).sum(1)


def block(gate_up, down, router, renormalize: bool) -> SparseMoeBlock:
    layer = SparseMoeBlock(HIDDEN, EXPERTS, TOP_K, INTER, "silu", renormalize)
    layer.gate.weight.data.copy_(router)
    layer.experts.w13.weight.weight_loader(layer.experts.w13.weight, gate_up, None)
    layer.experts.w2.weight.weight_loader(layer.experts.w2.weight, down, None)
    return layer


def skewed_inputs(tokens: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and a router under which experts 0 and 1 take most tokens and some experts none."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, HIDDEN, generator=g)
    router = torch.randn(EXPERTS, HIDDEN, generator=g) * 0.3
    router[:2] += x.mean(0) * 2  # experts 0 and 1 favoured by every token
    return x, router


@pytest.mark.parametrize("renormalize", [True, False])
def test_native_form_equals_the_dense_reference(renormalize):
    gate_up, down = random_experts()
    x, router = skewed_inputs()
    layer = block(gate_up, down, router, renormalize)
    _, ids = route(F.linear(x, router), TOP_K, renormalize)
    counts = torch.bincount(ids.flatten(), minlength=EXPERTS)
    assert counts.max() >= 3 and (counts == 0).any(), counts  # shared experts and idle ones
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_reference(x, F.linear(x, router), gate_up, down, renormalize),
                                   rtol=1e-5, atol=1e-5)


def test_renormalisation_changes_the_output():
    gate_up, down = random_experts()
    x, router = skewed_inputs()
    with torch.no_grad():
        assert not torch.allclose(block(gate_up, down, router, True)(x), block(gate_up, down, router, False)(x))


def test_routing_renormalises_the_top_k_of_a_float32_softmax():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]], dtype=torch.bfloat16)
    weights, ids = route(logits, 2, True)
    assert ids.tolist() == [[1, 2]] and weights.dtype == torch.bfloat16
    expected = torch.softmax(logits.float(), -1)[0, [1, 2]]
    torch.testing.assert_close(weights[0].float(), (expected / expected.sum()).bfloat16().float())


def test_hub_transposed_and_per_expert_tensors_load_alike():
    gate_up, down = random_experts()
    fused = FusedMoE(EXPERTS, HIDDEN, INTER, "silu")
    fused.load_w13(fused.w13.weight, gate_up.transpose(1, 2).contiguous())  # the hub's files: each expert transposed
    fused.load_w2(fused.w2.weight, down.transpose(1, 2).contiguous())
    apart = FusedMoE(EXPERTS, HIDDEN, INTER, "silu")
    for e in range(EXPERTS):
        gate, up = gate_up[e].chunk(2)
        apart.load_w13(apart.w13.weight, gate, (e, 0))
        apart.load_w13(apart.w13.weight, up, (e, 1))
        apart.load_w2(apart.w2.weight, down[e], e)
    assert torch.equal(fused.w13.weight, gate_up) and torch.equal(fused.w2.weight, down)
    assert torch.equal(apart.w13.weight, gate_up) and torch.equal(apart.w2.weight, down)


def test_tensor_parallel_2_shards_sum_to_the_unsplit_layer(monkeypatch):
    """Each rank holds half of every expert's gate, up and down; the all-reduce's sum is the whole layer."""
    gate_up, down = random_experts()
    x, router = skewed_inputs()
    whole = block(gate_up, down, router, True)
    weights, ids = route(F.linear(x, router), TOP_K, True)
    parts = []
    monkeypatch.setattr(moe, "tp_size", lambda: 2)
    for rank in range(2):
        monkeypatch.setattr(moe, "tp_rank", lambda rank=rank: rank)
        shard = block(gate_up, down, router, True)
        assert shard.experts.w13.weight.shape == (EXPERTS, INTER, HIDDEN)
        parts.append(shard.experts.forward_native(x, weights, ids))
    torch.testing.assert_close(parts[0] + parts[1], whole.experts.forward_native(x, weights, ids),
                               rtol=1e-5, atol=1e-5)


def test_native_form_reads_only_the_chosen_experts():
    """Poisoned weights of experts no token chose leave the output unchanged: no dense all-expert product."""
    gate_up, down = random_experts()
    x, router = skewed_inputs(tokens=2)
    layer = block(gate_up, down, router, True)
    _, ids = route(F.linear(x, router), TOP_K, True)
    idle = sorted(set(range(EXPERTS)) - set(ids.flatten().tolist()))
    assert idle
    with torch.no_grad():
        before = layer(x)
        layer.experts.w13.weight[idle] = float("nan")
        layer.experts.w2.weight[idle] = float("nan")
        assert torch.equal(layer(x), before)


def test_dense_form_for_graph_capture_equals_the_native_form():
    """What runs under CUDA-graph capture (every expert, no host synchronisation) gives the native form's output."""
    gate_up, down = random_experts()
    x, router = skewed_inputs()
    layer = block(gate_up, down, router, True)
    weights, ids = route(F.linear(x, router), TOP_K, True)
    torch.testing.assert_close(layer.experts.forward_dense(x, weights, ids),
                               layer.experts.forward_native(x, weights, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_form_equals_the_native_form(dtype):
    """The CUDA form (through Triton's interpreter on CPUs): widths not multiples of its blocks, shared and idle
    experts."""
    pytest.importorskip("triton")
    from vllm_utils.kernels import triton_moe

    gate_up, down = random_experts()
    x, router = skewed_inputs()
    layer = block(gate_up, down, router, True).to(dtype)
    x = x.to(dtype)
    weights, ids = route(F.linear(x, layer.gate.weight), TOP_K, True)
    experts = layer.experts
    assert triton_moe.supports(x, ids, experts.w13.weight, experts.w2.weight, experts.act)
    ours = triton_moe.fused_moe(x, experts.w13.weight, experts.w2.weight, weights, ids)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours, experts.forward_native(x, weights, ids), rtol=tol, atol=tol)


def test_cpu_form_equals_the_native_form():
    """The CPU platform's form (each chosen expert's products on our bf16 decode kernel where an expert has at most
    4 rows, else PyTorch's): a decode-sized batch (tokens sharing an expert, idle experts, every product on the
    kernel), then a prompt-sized one where one expert has more rows than the kernel takes."""
    from vllm_utils.config import EngineConfig
    from vllm_utils.kernels import cpu
    from vllm_utils.platforms.cpu import CpuPlatform

    if cpu.unavailable_reason():
        pytest.skip(f"no CPU kernels here: {cpu.unavailable_reason()}")
    g = torch.Generator().manual_seed(2)
    experts, hidden, inter = 8, 64, 32
    layer = SparseMoeBlock(hidden, experts, TOP_K, inter, "silu", True).to(torch.bfloat16)
    for p in layer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    native = SparseMoeBlock(hidden, experts, TOP_K, inter, "silu", True).to(torch.bfloat16)
    native.load_state_dict(layer.state_dict())
    CpuPlatform().choose_kernels(layer, EngineConfig("unused"), [])
    linear, calls = cpu.linear, []
    cpu.linear = lambda *args: calls.append(1) or linear(*args)
    try:
        most = cpu.max_rows()
        for tokens, skew in ((3, 0.0), (most + 3, 4.0)):
            x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
            bias = torch.zeros(experts, hidden, dtype=torch.bfloat16)
            bias[0] = x.mean(0) * skew  # more tokens than the kernel takes: expert 0 is everyone's
            weights, ids = route(F.linear(x, layer.gate.weight + bias), TOP_K, True)
            counts = torch.bincount(ids.flatten(), minlength=experts)
            assert (counts == 0).any() and (counts[0] > most) == (tokens == most + 3)
            calls.clear()
            ours = layer.experts.run(x, weights, ids)
            assert len(calls) == 2 * int((counts > 0).sum() - (counts > most).sum())
            expected = native.experts.forward_native(x, weights, ids)
            error = (ours.float() - expected.float()).norm() / expected.float().norm()
            assert error < 1e-2, error  # bf16 products summed in another order
    finally:
        cpu.linear = linear
