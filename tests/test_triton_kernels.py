"""The Triton kernels (the CUDA paths) against the PyTorch code they replace: on a GPU where there is one,
else on CPU tensors through Triton's interpreter (conftest sets TRITON_INTERPRET)."""
import pytest
import torch

from vllm_utils.attention.metadata import AttentionMetadata
from vllm_utils.attention.torch_backend import TorchPagedAttention
from vllm_utils.layers.rotary import RotaryEmbedding

from conftest import uncaptured_graph_mode

triton = pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Triton's interpreter has no true bfloat16: tl.dot multiplies its bit patterns (triton-lang/triton#11584)
# and float32 -> bfloat16 casts truncate where GPUs round to nearest even. There the 16-bit cases run float16.
HALF = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16


@pytest.mark.parametrize("block_size, heads, kv_heads, dtype, longest, window", [
    (16, 32, 32, HALF, 257, None), (1, 8, 2, torch.float16, 257, None), (64, 16, 4, torch.float32, 257, None),
    (5, 4, 4, torch.float32, 257, None), (16, 8, 2, HALF, 100, None),  # the last fits one split: no partials
    (16, 8, 2, torch.float32, 257, 70), (4, 8, 2, torch.float32, 100, 3),  # sliding windows, several splits or one
])
def test_paged_decode_matches_the_torch_reference(block_size, heads, kv_heads, dtype, longest, window):
    from vllm_utils.attention.triton_backend import TritonPagedAttention

    torch.manual_seed(block_size)
    dim, num_blocks = 128, 300
    context_lens = torch.tensor([1, 7, min(130, longest), longest, 64], dtype=torch.int32, device=DEVICE)
    width = int(-(-context_lens.max() // block_size))
    tables = torch.stack([torch.randperm(num_blocks, device=DEVICE)[:width] for _ in context_lens]).int()
    shape = (num_blocks, block_size, kv_heads, dim)
    caches = [torch.randn(shape, dtype=dtype, device=DEVICE) for _ in range(2)]
    q = torch.randn(len(context_lens), heads, dim, dtype=dtype, device=DEVICE)
    k = torch.randn(len(context_lens), kv_heads, dim, dtype=dtype, device=DEVICE)
    v = torch.randn_like(k)
    positions = (context_lens - 1).long()
    slots = tables.long().gather(1, (positions // block_size)[:, None]).squeeze(1) * block_size + positions % block_size
    meta = AttentionMetadata(False, slots, block_tables=tables, context_lens=context_lens)
    outputs = []
    for backend in (TorchPagedAttention(), TritonPagedAttention()):  # the reference gathers
        k_cache, v_cache = caches[0].clone(), caches[1].clone()
        backend.store_kv(k, v, k_cache, v_cache, slots)
        outputs.append((backend.attend(q, k, v, k_cache, v_cache, meta, dim**-0.5, window).float(), k_cache, v_cache))
    (ref, k_ref, v_ref), (out, k_out, v_out) = outputs
    assert torch.equal(k_ref, k_out) and torch.equal(v_ref, v_out)  # the same slots written
    assert ((out - ref).norm() / ref.norm()).item() < (1e-2 if dtype != torch.float32 else 1e-3)


@pytest.mark.parametrize("dtype", [HALF, torch.float32])
def test_rope_and_store_equals_rotary_then_store(dtype):
    from vllm_utils.kernels import triton_fused

    torch.manual_seed(0)
    tokens, heads, kv_heads, dim, block_size = 9, 8, 2, 64, 4
    rotary = RotaryEmbedding(dim, 512, {"rope_type": "default", "rope_theta": 10000.0}).to(DEVICE)
    positions = torch.randint(0, 512, (tokens,), device=DEVICE)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype, device=DEVICE)
    q, k, v = (t.view(tokens, -1, dim) for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1))
    slots = torch.randperm(10 * block_size, device=DEVICE)[:tokens]
    slots[3] = -1  # a row with no slot writes nothing
    cache_shape = (10, block_size, kv_heads, dim)
    k_cache, v_cache = (torch.zeros(cache_shape, dtype=dtype, device=DEVICE) for _ in range(2))

    q_ref, k_ref = rotary(positions, q.clone(), k.clone())
    triton_fused.rope_and_store_(q, k, v, positions, rotary.cos, rotary.sin, k_cache, v_cache, slots)
    if DEVICE.type == "cuda":  # the GPU may contract a product and a sum into one FMA: one rounding step apart
        torch.testing.assert_close(q, q_ref, rtol=2**-7, atol=2**-7)
        torch.testing.assert_close(k, k_ref, rtol=2**-7, atol=2**-7)
    else:
        assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    written = slots >= 0
    assert torch.equal(k_cache.view(-1, kv_heads, dim)[slots[written]], k[written])
    assert torch.equal(v_cache.view(-1, kv_heads, dim)[slots[written]], v[written])
    untouched = torch.ones(k_cache.shape[0] * block_size, dtype=torch.bool, device=DEVICE)
    untouched[slots[written]] = False
    assert not k_cache.view(-1, kv_heads, dim)[untouched].any() and not v_cache.view(-1, kv_heads, dim)[untouched].any()


@pytest.mark.parametrize("dtype", [HALF, torch.float32])
def test_rope_and_store_of_three_position_rows_equals_transformers_qwen2_vl(dtype):
    """The fused RoPE + K/V store with Qwen2-VL's multimodal RoPE (positions [3, tokens]) against transformers'
    rotary embedding."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb

    from vllm_utils.attention.triton_backend import TritonPagedAttention
    from vllm_utils.layers.rotary import MRotaryEmbedding

    torch.manual_seed(1)
    tokens, heads, kv_heads, dim, sections = 9, 4, 2, 64, [8, 12, 12]
    rope = {"rope_type": "default", "rope_theta": 1e6}
    hf = Qwen2VLRotaryEmbedding(Qwen2VLTextConfig(hidden_size=heads * dim, num_attention_heads=heads,
                                                  num_key_value_heads=kv_heads,
                                                  rope_parameters={**rope, "mrope_section": sections})).to(DEVICE)
    rotary = MRotaryEmbedding(dim, 1024, rope, sections).to(DEVICE)
    positions = torch.randint(0, 1024, (3, tokens), device=DEVICE)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype, device=DEVICE)
    q, k, v = (t.view(tokens, -1, dim) for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1))
    cos, sin = hf(q, positions[:, None, :])
    q_ref, k_ref = (t[0].transpose(0, 1) for t in apply_rotary_pos_emb(q.transpose(0, 1)[None],
                                                                       k.transpose(0, 1)[None], cos, sin))
    k_cache, v_cache = (torch.zeros(4, 4, kv_heads, dim, dtype=dtype, device=DEVICE) for _ in range(2))
    slots = torch.randperm(16, device=DEVICE)[:tokens]
    TritonPagedAttention().rope_and_store(positions, q, k, v, rotary, k_cache, v_cache, slots)
    tolerance = {"rtol": 2**-7, "atol": 2**-7} if DEVICE.type == "cuda" else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(q, q_ref, **tolerance)
    torch.testing.assert_close(k, k_ref, **tolerance)
    assert torch.equal(k_cache.view(-1, kv_heads, dim)[slots], k)


def test_add_rmsnorm_and_silu_mul_equal_the_pytorch_layers():
    from vllm_utils.kernels import triton_fused

    torch.manual_seed(0)
    hidden = 4096
    x = torch.randn(7, hidden, dtype=HALF, device=DEVICE)
    residual = torch.randn_like(x)
    weight = torch.rand(hidden, device=DEVICE, dtype=HALF)
    expected_residual = residual + x
    res_fused = residual.clone()
    fused = triton_fused.add_rmsnorm(x, weight, 1e-5, res_fused)
    variance = expected_residual.float().pow(2).mean(-1, keepdim=True)
    reference = weight * (expected_residual.float() * torch.rsqrt(variance + 1e-5)).to(HALF)
    assert torch.equal(res_fused, expected_residual)
    assert (fused.float() - reference.float()).abs().max().item() <= 2 ** -6 * reference.float().abs().max().item()

    gate_up = torch.randn(7, 2 * 11008, dtype=HALF, device=DEVICE)
    gate, up = gate_up.chunk(2, dim=-1)
    fused, reference = triton_fused.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up
    if DEVICE.type == "cuda":
        assert torch.equal(fused, reference)
    else:  # numpy's exp and PyTorch's can differ in float32's last bit, which flips a rare 16-bit rounding
        torch.testing.assert_close(fused, reference, rtol=2**-9, atol=0)  # one float16 ulp


@pytest.mark.skipif(DEVICE.type == "cuda", reason="test_cuda.py runs this path on the GPU itself")
@pytest.mark.parametrize("triton_gemv_on", [False, True], ids=["cublas-linears", "triton-gemv"])
def test_the_cuda_code_path_gives_hf_greedy_tokens(tiny_llava, hf_reference, images, triton_gemv_on, monkeypatch):
    """The engine as it runs on CUDA in graph mode (the kernels the CUDA platform chooses: fused Triton layers,
    Triton paged attention, optionally the Triton GEMV; padded graph steps), interpreted on CPU and without
    capture."""
    from vllm_utils import LLM, SamplingParams
    from vllm_utils.attention.triton_backend import TritonPagedAttention
    from vllm_utils.kernels import triton_gemv
    from vllm_utils.platforms.cuda import CudaPlatform

    monkeypatch.setattr(triton_gemv, "GEMV_CONFIG", (4096, 64, 4, 1))  # few programs: the interpreter runs each
    calls = []
    monkeypatch.setattr(triton_gemv, "gemv", lambda *args, gemv=triton_gemv.gemv: calls.append(1) or gemv(*args))
    llm = LLM(tiny_llava, device="cpu", dtype="float32", max_model_len=512, triton_gemv=triton_gemv_on)
    llm.engine.runner.choose_kernels(CudaPlatform())
    assert isinstance(llm.engine.runner.backend, TritonPagedAttention)
    uncaptured_graph_mode(llm)
    texts = ["Describe the picture.", "What is in this image? Answer in one short sentence.", "Compare."]
    reqs = [{"prompt": llm.engine.processor.chat_prompt(t), "multi_modal_data": {"image": images[i % 2]}}
            for i, t in enumerate(texts)]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    if triton_gemv_on:  # it takes single rows: one request alone
        reqs = reqs[:1]
    outputs = llm.generate(reqs, greedy, use_tqdm=False)
    for req, out in zip(reqs, outputs):
        assert out.outputs[0].token_ids == hf_reference.greedy(req, 24)
    assert bool(calls) == triton_gemv_on


@pytest.mark.parametrize("n, k, bias", [(300, 1000, False), (64, 4096, True), (1, 17, False)])
def test_gemv_equals_a_float64_product(n, k, bias):
    from vllm_utils.kernels import triton_gemv

    torch.manual_seed(n)
    x = torch.randn(1, k, dtype=HALF, device=DEVICE)
    weight = torch.randn(n, k, dtype=HALF, device=DEVICE)
    b = torch.randn(n, dtype=HALF, device=DEVICE) if bias else None
    reference = x.double() @ weight.double().T + (b.double() if bias else 0)
    for config in ((16, 256, 4, 4), (32, 64, 4, 2)):  # a tail in N and in K either way
        out = triton_gemv.gemv(x, weight, b, config)
        assert out.shape == (1, n) and out.dtype == HALF
        # float32 sums, rounded once to 16 bits: within one 16-bit rounding of the exact product
        torch.testing.assert_close(out.double(), reference, rtol=2**-9, atol=1e-2)


@pytest.mark.parametrize("key_heads, value_heads, key_dim, value_dim", [(2, 4, 16, 24), (1, 1, 32, 64)])
def test_the_delta_rule_decode_step_equals_the_native_form(key_heads, value_heads, key_dim, value_dim):
    """Views of a fused projection (strided rows), grouped value heads, a value dim over several column blocks
    and one not a multiple of them; only the slots of the step change."""
    from vllm_utils.kernels import triton_delta_rule
    from vllm_utils.layers.delta_rule import recurrent_delta_rule

    gen = torch.Generator().manual_seed(key_dim)
    seqs, keys, values = 3, key_heads * key_dim, value_heads * value_dim
    mixed = torch.randn(seqs, 2 * keys + values, generator=gen).to(DEVICE)
    q, k, v = mixed.split([keys, keys, values], dim=-1)
    q, k, v = q.view(seqs, key_heads, key_dim), k.view(seqs, key_heads, key_dim), v.view(seqs, value_heads, value_dim)
    g = (-torch.rand(seqs, value_heads, generator=gen)).to(DEVICE)
    beta = torch.rand(seqs, value_heads, generator=gen).to(DEVICE)
    pool = torch.randn(6, value_heads, key_dim, value_dim, generator=gen).to(DEVICE) * 0.1
    slots = torch.tensor([4, 0, 2], device=DEVICE)
    before = pool.clone()
    assert triton_delta_rule.supports(q, k, v, pool)
    out = triton_delta_rule.recurrent_step_(q, k, v, g, beta, pool, slots)
    expected, states = recurrent_delta_rule(q, k, v, g, beta, before[slots])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool[slots], states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool[[1, 3, 5]], before[[1, 3, 5]])
