"""The bf16 CPU kernels (vllm_utils/kernels/cpu_kernels.c) against float64 references and PyTorch, and the CPU
platform's choice of them."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vllm_utils.attention.torch_backend import visible_keys
from vllm_utils.config import EngineConfig
from vllm_utils.kernels import cpu as cpu_kernels
from vllm_utils.kernels.cpu_linear import DecodeLinear, OneDnnLinear, PackedOneDnnLinear, can_pack_for_onednn
from vllm_utils.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm_utils.platforms.cpu import CpuPlatform, _kernel_for as kernel_for


def choose_cpu_kernels(model: nn.Module, prompt_only: list | None = None, **config) -> None:
    CpuPlatform().choose_kernels(model, EngineConfig(model="unused", **config), prompt_only or [])

needs_kernel = pytest.mark.skipif(bool(cpu_kernels.unavailable_reason()),
                                  reason=f"CPU decode kernel unavailable: {cpu_kernels.unavailable_reason()}")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 11, 16])
@pytest.mark.parametrize("n,k,bias", [(4, 32, False), (96, 160, True), (2052, 1024, False)])
def test_kernel_rounds_the_exact_product_once(rows, n, k, bias):
    gen = torch.Generator().manual_seed(rows * n + k)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, generator=gen).to(torch.bfloat16) if bias else None
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    ours = cpu_kernels.linear(x, w, b)
    assert ours.shape == (rows, n) and ours.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: one rounding of a (near-)exact sum is within 2^-8 of it, relative
    assert torch.all((ours.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6 * exact.abs().max())
    # and it agrees with PyTorch's own bf16 linear to within one bf16 step
    assert torch.allclose(ours.float(), F.linear(x, w, b).float(), rtol=2**-7, atol=1e-3)


@needs_kernel
@pytest.mark.parametrize("distance", [0, 256, 4096])
def test_prefetch_distance_never_changes_results(distance):
    """The prefetch distance is chosen per CPU vendor; whatever it is, the outputs are the same bits."""
    lib = cpu_kernels._load()[0]
    gen = torch.Generator().manual_seed(distance)
    w = torch.randn(2048, 2048, generator=gen).to(torch.bfloat16)
    x = torch.randn(3, 2048, generator=gen).to(torch.bfloat16)
    k, v = torch.randn(2, 50, 4, 64, generator=gen).to(torch.bfloat16)
    q = torch.randn(8, 64, generator=gen).to(torch.bfloat16)
    try:
        before = [cpu_kernels.linear(x[:1], w), cpu_kernels.linear(x, w), cpu_kernels.decode_attention(q, k, v, 0.125)]
        lib.vllm_utils_set_prefetch(distance)
        after = [cpu_kernels.linear(x[:1], w), cpu_kernels.linear(x, w), cpu_kernels.decode_attention(q, k, v, 0.125)]
    finally:
        lib.vllm_utils_set_prefetch(cpu_kernels.prefetch_distance())
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@needs_kernel
def test_kernel_reads_strided_rows_and_keeps_leading_dims():
    w = torch.randn(64, 96).to(torch.bfloat16)
    x = torch.randn(3, 200).to(torch.bfloat16)[:, 7:103]  # rows 200 apart, not contiguous
    out = cpu_kernels.linear(x[None], w)
    assert out.shape == (1, 3, 64)
    assert torch.allclose(out[0].float(), F.linear(x.float(), w.float()), rtol=2**-7, atol=1e-3)


@needs_kernel
def test_layers_use_the_kernel_for_decode_rows_only(monkeypatch):
    layer = RowParallelLinear(64, 32, bias=True)
    layer.weight.data = torch.randn(32, 64).to(torch.bfloat16)
    layer.bias.data = torch.randn(32).to(torch.bfloat16)
    choose_cpu_kernels(layer)
    assert isinstance(layer.impl, DecodeLinear)
    calls = []
    real = cpu_kernels.linear
    monkeypatch.setattr(cpu_kernels, "linear", lambda *a: calls.append(a[0].shape) or real(*a))
    most = cpu_kernels.max_rows()
    for rows in (1, most, most + 1, 600):
        x = torch.randn(rows, 64).to(torch.bfloat16)
        assert torch.allclose(layer(x).float(), F.linear(x, layer.weight, layer.bias).float(), rtol=2**-7, atol=1e-3)
    assert [s[0] for s in calls] == [1, most]  # prefill-sized inputs stay on oneDNN


def test_unsupported_weights_fall_back():
    assert not cpu_kernels.supports(torch.zeros(8, 32))  # fp32
    assert not cpu_kernels.supports(torch.zeros(6, 32, dtype=torch.bfloat16))  # rows not a multiple of 4
    assert not cpu_kernels.supports(torch.zeros(8, 48, dtype=torch.bfloat16))  # columns not a multiple of 32


def test_the_environment_switch_is_the_config_default_and_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("VLLM_UTILS_CPU_KERNELS", "0")
    config = EngineConfig(model="unused")
    assert config.cpu_kernels is False
    layer = RowParallelLinear(64, 32)
    layer.weight.data = torch.randn(32, 64).to(torch.bfloat16)
    CpuPlatform().choose_kernels(layer, config, [])
    assert type(layer.impl) is OneDnnLinear  # oneDNN, not our decode kernel


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,dim,length", [(16, 16, 128, 600), (4, 2, 64, 37), (8, 1, 32, 1), (6, 3, 256, 5),
                                                       (4, 2, 64, 2100)])
def test_decode_attention_matches_float64_sdpa(heads, kv_heads, dim, length):
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(heads, dim, generator=gen).to(torch.bfloat16)
    pool_k = torch.randn(length + 9, kv_heads, dim, generator=gen).to(torch.bfloat16)
    pool_v = torch.randn(length + 9, kv_heads, dim, generator=gen).to(torch.bfloat16)
    k, v = pool_k[4 : 4 + length], pool_v[4 : 4 + length]  # a run inside the pool, read in place
    assert cpu_kernels.supports_attention(q, k, v)
    exact = F.scaled_dot_product_attention(q.double()[None, :, None], k.double().transpose(0, 1)[None],
                                           v.double().transpose(0, 1)[None], scale=dim**-0.5, enable_gqa=True)[0, :, 0]
    ours = cpu_kernels.decode_attention(q, k, v, dim**-0.5)
    assert ours.shape == (heads, dim)
    assert torch.all((ours.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-4)


def test_decode_attention_refuses_what_it_cannot_read():
    q, k = torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(10, 2, 64, dtype=torch.bfloat16)
    assert not cpu_kernels.supports_attention(q.float(), k.float(), k.float())
    assert not cpu_kernels.supports_attention(q, k.transpose(0, 1), k.transpose(0, 1))  # rows not dense
    q48, k48 = torch.zeros(4, 48, dtype=torch.bfloat16), torch.zeros(10, 2, 48, dtype=torch.bfloat16)
    assert not cpu_kernels.supports_attention(q48, k48, k48)  # dim not a multiple of 32


@needs_kernel
@pytest.mark.parametrize("rows,width", [(1, 512), (4, 512), (37, 512), (3, 520)])
def test_rmsnorm_kernel_matches_the_pytorch_layer(rows, width):
    from vllm_utils.layers.norm import RMSNorm

    gen = torch.Generator().manual_seed(rows)
    norm = RMSNorm(width, 1e-5)
    norm.weight.data = torch.rand(width, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, width, generator=gen).to(torch.bfloat16)
    residual = torch.randn(rows, width, generator=gen).to(torch.bfloat16)
    ours_residual, torch_residual = residual.clone(), residual.clone()
    ours = cpu_kernels.rmsnorm(x, norm.weight, 1e-5, ours_residual)
    torch_residual.add_(x)
    h = torch_residual.float()
    reference = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(ours_residual, torch_residual)  # the residual stream is updated exactly
    # the mean of squares is summed in another order: a rare output lands one bf16 step away, never more
    assert torch.allclose(ours.float(), reference.float(), rtol=2**-7, atol=0)
    assert (ours != reference).float().mean() < 0.01
    assert torch.equal(cpu_kernels.rmsnorm(x, norm.weight, 1e-5), cpu_kernels.rmsnorm(x.clone(), norm.weight, 1e-5))


@needs_kernel
@pytest.mark.parametrize("rope_type,dim", [("default", 64), ("llama3", 128), ("default", 40)])
def test_rope_kernel_is_bit_identical_to_pytorch(rope_type, dim):
    from vllm_utils.layers.rotary import RotaryEmbedding, rotate_half

    params = {"rope_type": "default", "rope_theta": 10000.0} if rope_type == "default" else {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
    rotary = RotaryEmbedding(dim, 4096, params)
    qkv = torch.randn(5, 8 * dim).to(torch.bfloat16)
    q, k = qkv[:, : 6 * dim].view(5, 6, dim), qkv[:, 6 * dim :].view(5, 2, dim)  # views into the fused output
    positions = torch.tensor([0, 1, 77, 1500, 4095])
    cos = rotary.cos[positions].to(torch.bfloat16).unsqueeze(1)
    sin = rotary.sin[positions].to(torch.bfloat16).unsqueeze(1)
    expected_q, expected_k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    assert cpu_kernels.supports_rope(q, positions, rotary.cos)
    rotary.impl = kernel_for(rotary)  # what the CPU platform gives a bf16 model's RoPE
    out_q, out_k = rotary(positions, q, k)
    assert torch.equal(out_q, expected_q) and torch.equal(out_k, expected_k)


@needs_kernel
def test_multimodal_rope_kernel_is_bit_identical_to_transformers_qwen2_vl():
    """Qwen2-VL's RoPE of three position rows (time, height, width) through the C kernel, against transformers'
    own rotary embedding and its bf16 arithmetic."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb

    from vllm_utils.layers.rotary import MRotaryEmbedding

    dim, sections, tokens = 128, [16, 24, 24], 11
    rope = {"rope_type": "default", "rope_theta": 1e6}
    hf = Qwen2VLRotaryEmbedding(Qwen2VLTextConfig(hidden_size=4 * dim, num_attention_heads=4, num_key_value_heads=2,
                                                  rope_parameters={**rope, "mrope_section": sections}))
    rotary = MRotaryEmbedding(dim, 4096, rope, sections)
    rotary.impl = kernel_for(rotary)
    positions = torch.randint(0, 4096, (3, tokens))
    qkv = torch.randn(tokens, 8 * dim).to(torch.bfloat16)
    q, k = qkv[:, : 6 * dim].view(tokens, 6, dim), qkv[:, 6 * dim :].view(tokens, 2, dim)
    cos, sin = hf(q, positions[:, None, :])
    expected = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    index, cos_table, _ = rotary.tables(positions)
    assert cpu_kernels.supports_rope(q, index, cos_table)
    out_q, out_k = rotary(positions, q, k)
    assert torch.equal(out_q, expected[0][0].transpose(0, 1)) and torch.equal(out_k, expected[1][0].transpose(0, 1))


@needs_kernel
def test_decode_attention_gives_the_same_result_on_one_thread():
    q, k, v = (torch.randn(*shape).to(torch.bfloat16) for shape in [(8, 64), (300, 4, 64), (300, 4, 64)])
    threads = torch.get_num_threads()
    both = cpu_kernels.decode_attention(q, k, v, 0.125)
    torch.set_num_threads(1)
    try:
        one = cpu_kernels.decode_attention(q, k, v, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, both)  # the chunks, and so the sums, do not depend on which thread takes them


@needs_kernel
def test_layers_read_ahead_into_the_next_weight_without_changing_results():
    from torch import nn

    model = nn.Sequential(RowParallelLinear(64, 128), RowParallelLinear(128, 64), RowParallelLinear(64, 32))
    for layer in model:
        layer.weight.data = torch.randn(layer.weight.shape).to(torch.bfloat16)
    choose_cpu_kernels(model)
    assert all(isinstance(layer.impl, DecodeLinear) for layer in model)
    assert model[0].impl.next_weight.data_ptr() == model[1].weight.data_ptr()
    assert model[1].impl.next_weight.data_ptr() == model[2].weight.data_ptr()
    assert model[2].impl.next_weight is None
    x = torch.randn(2, 64).to(torch.bfloat16)
    alone = cpu_kernels.linear(x, model[0].weight)
    assert torch.equal(cpu_kernels.linear(x, model[0].weight, None, model[1].weight), alone)


@needs_kernel
@pytest.mark.parametrize("tokens,heads,kv_heads,dim,causal,window,runs", [
    (577, 4, 4, 64, False, None, ()), (130, 4, 2, 128, True, None, ()), (1, 2, 1, 64, True, None, ()),
    (33, 8, 1, 192, False, None, ()), (200, 4, 2, 128, True, 70, ()), (130, 2, 1, 256, True, 5, ()),  # windows
    # runs of positions seeing each other both ways (images): across query and key blocks, at the end, windowed
    (200, 4, 2, 128, True, None, ((3, 70), (100, 101), (150, 200))), (130, 2, 1, 256, True, 40, ((20, 90),)),
])
def test_prefill_attention_matches_float64_sdpa(tokens, heads, kv_heads, dim, causal, window, runs):
    """Views of a fused QKV output (strided rows), lengths around the 32-query and 64-key blocks, GQA, windows
    shorter than a key block and spanning several, bidirectional runs."""
    gen = torch.Generator().manual_seed(tokens + dim)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen) * 2).to(torch.bfloat16)
    q, k, v = (t.view(tokens, -1, dim) for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1))
    assert cpu_kernels.supports_prefill_attention(q, k, v)
    positions = torch.arange(tokens)
    ends = positions.to(torch.int32) + 1
    for first, last in runs:
        ends[first:last] = last
    ours = cpu_kernels.prefill_attention(q, k, v, dim**-0.5, causal, window, ends if runs else None)
    group = heads // kv_heads
    mask = visible_keys(positions, tokens, window, ends) if window or runs else None

    def sdpa(dtype: torch.dtype) -> torch.Tensor:  # [tokens, heads, dim], KV heads repeated for the groups
        args = (t.to(dtype).repeat_interleave(n, 1).transpose(0, 1) for t, n in ((q, 1), (k, group), (v, group)))
        return F.scaled_dot_product_attention(*args, attn_mask=mask, is_causal=causal and mask is None,
                                              scale=dim**-0.5).transpose(0, 1)

    exact = sdpa(torch.float64)
    assert ours.shape == q.shape and ours.dtype == torch.bfloat16
    # probabilities pass through bf16 once before the second product (as in flash attention on GPUs): the
    # error stays within twice that of PyTorch's own bf16 SDPA, and within a few bf16 steps of the values
    error, torch_error = ((t.double() - exact).abs().max().item() for t in (ours, sdpa(torch.bfloat16)))
    assert error <= 2 * torch_error + 1e-3
    assert torch.allclose(ours.double(), exact, rtol=2**-6, atol=2**-6)


def test_prefill_attention_refuses_what_it_cannot_read():
    q = torch.randn(10, 4, 32, dtype=torch.bfloat16)  # head_dim not a multiple of 64
    assert not cpu_kernels.supports_prefill_attention(q, q, q)
    q = torch.randn(10, 4, 64, dtype=torch.bfloat16)
    assert not cpu_kernels.supports_prefill_attention(q.transpose(0, 1).contiguous().transpose(0, 1), q, q)
    assert not cpu_kernels.supports_prefill_attention(q.float(), q.float(), q.float())
    odd = torch.randn(10, 4 * 64 + 1, dtype=torch.bfloat16)[:, : 4 * 64].view(10, 4, 64)  # rows 257 values apart
    assert cpu_kernels.supports_prefill_attention(q, q, q) and not cpu_kernels.supports_prefill_attention(q, odd, odd)


@needs_kernel
def test_activation_kernels_are_bit_identical_to_pytorch():
    """SiLU·up and quick_gelu round where PyTorch's bf16 ops do; their exp differs from libm's by ~2e-7, which
    bf16 does not see. Inputs span saturation on both sides; the SiLU input is a strided view."""
    gen = torch.Generator().manual_seed(0)
    wide = (torch.randn(37, 2 * 5632 + 64, generator=gen) * 8).to(torch.bfloat16)
    gate_up = wide[:, : 2 * 5632]
    assert cpu_kernels.supports_activation(gate_up)
    assert torch.equal(cpu_kernels.silu_mul(gate_up), F.silu(gate_up[:, :5632]) * gate_up[:, 5632:])
    x = (torch.randn(2, 577, 1024, generator=gen) * 8).to(torch.bfloat16)
    assert torch.equal(cpu_kernels.quick_gelu(x), x * torch.sigmoid(1.702 * x))
    assert not cpu_kernels.supports_activation(torch.randn(4, 48, dtype=torch.bfloat16))  # halves of 24


@pytest.mark.skipif(not can_pack_for_onednn(), reason="oneDNN has no bf16 path on this CPU (or this PyTorch)")
def test_linears_packed_for_onednn_give_the_same_products():
    """The vision tower's linears trade their plain weight for oneDNN's packed one (no second copy)."""
    gen = torch.Generator().manual_seed(0)
    layer = ColumnParallelLinear(256, 512, bias=True)
    layer.weight.data = torch.randn(512, 256, generator=gen).to(torch.bfloat16)
    layer.bias.data = torch.randn(512, generator=gen).to(torch.bfloat16)
    x = torch.randn(2, 577, 256, generator=gen).to(torch.bfloat16)
    plain = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    choose_cpu_kernels(layer, prompt_only=[(layer, 577)])
    assert isinstance(layer.impl, PackedOneDnnLinear) and layer.weight.numel() == 0
    packed = layer(x)
    assert packed.shape == (2, 577, 512) and packed.dtype == torch.bfloat16
    assert torch.allclose(packed.float(), plain, rtol=2**-7, atol=1e-2)
    fp32 = ColumnParallelLinear(256, 512, bias=False)
    choose_cpu_kernels(fp32, prompt_only=[(fp32, 577)])
    assert fp32.impl is None  # fp32 layers keep the native product


def test_a_cpu_without_onednn_bf16_keeps_plain_weights():
    """On a CPU where oneDNN has no bf16 path (AVX2 only; here oneDNN is held to AVX2 before torch loads), the
    vision tower's linears keep their plain weight, where packing it would raise."""
    import subprocess
    import sys

    code = ("import torch\n"
            "from vllm_utils.config import EngineConfig\n"
            "from vllm_utils.kernels.cpu_linear import OneDnnLinear\n"
            "from vllm_utils.layers.linear import ColumnParallelLinear\n"
            "from vllm_utils.platforms.cpu import CpuPlatform\n"
            "layer = ColumnParallelLinear(64, 32).to(torch.bfloat16)\n"
            "CpuPlatform().choose_kernels(layer, EngineConfig(model='unused', cpu_kernels=False), [(layer, 8)])\n"
            "assert isinstance(layer.impl, OneDnnLinear), layer.impl\n"
            "print(tuple(layer(torch.randn(8, 64).to(torch.bfloat16)).shape))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert run.returncode == 0 and run.stdout.strip() == "(8, 32)", run.stderr
