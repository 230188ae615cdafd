"""CUDA paths (skipped without a GPU): the engine on CUDA gives HF's fp32 greedy tokens."""
import pytest
import torch

from vllm_utils import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_cuda_matches_hf_fp32(tiny_llava, hf_reference, images, enforce_eager):
    torch.backends.cuda.matmul.allow_tf32 = False
    llm = LLM(tiny_llava, device="cuda", dtype="float32", max_model_len=512, enforce_eager=enforce_eager)
    texts = ["Describe the picture.", "What is in this image? Answer in one short sentence.", "Compare."]
    reqs = [{"prompt": llm.engine.processor.chat_prompt(t), "multi_modal_data": {"image": images[i % 2]}}
            for i, t in enumerate(texts)]
    outputs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    for i, (req, out) in enumerate(zip(reqs, outputs)):
        assert out.outputs[0].token_ids == hf_reference.greedy(req["prompt"], [images[i % 2]], 24)


@pytest.mark.parametrize("block_size, heads, kv_heads, dtype", [
    (16, 32, 32, torch.bfloat16), (1, 8, 2, torch.float16), (64, 16, 4, torch.bfloat16), (5, 4, 4, torch.float32),
])
def test_triton_paged_attention_matches_torch_reference(block_size, heads, kv_heads, dtype):
    from vllm_utils.attention.backend import AttentionMetadata
    from vllm_utils.attention.torch_paged import TorchPagedAttention
    from vllm_utils.attention.triton_paged import TritonPagedAttention

    torch.manual_seed(block_size)
    dim, num_blocks, device = 128, 300, "cuda"
    context_lens = torch.tensor([1, 7, 130, 257, 64], dtype=torch.int32, device=device)
    width = int(-(-context_lens.max() // block_size))
    tables = torch.stack([torch.randperm(num_blocks, device=device)[:width] for _ in context_lens]).int()
    shape = (num_blocks, block_size, kv_heads, dim)
    caches = [torch.randn(shape, dtype=dtype, device=device) for _ in range(2)]
    q = torch.randn(len(context_lens), heads, dim, dtype=dtype, device=device)
    k = torch.randn(len(context_lens), kv_heads, dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    positions = (context_lens - 1).long()
    slots = tables.long().gather(1, (positions // block_size)[:, None]).squeeze(1) * block_size + positions % block_size
    meta = AttentionMetadata(False, slots, block_tables=tables, context_lens=context_lens)
    outputs = []
    for backend in (TorchPagedAttention(torch.device(device)), TritonPagedAttention(torch.device(device))):
        k_cache, v_cache = caches[0].clone(), caches[1].clone()
        outputs.append((backend.forward(q, k, v, k_cache, v_cache, meta, dim**-0.5).float(), k_cache, v_cache))
    (ref, k_ref, v_ref), (out, k_out, v_out) = outputs
    assert torch.equal(k_ref, k_out) and torch.equal(v_ref, v_out)  # the same slots written
    assert ((out - ref).norm() / ref.norm()).item() < (1e-2 if dtype != torch.float32 else 1e-3)


def test_fused_kernels_equal_the_pytorch_layers():
    from vllm_utils.layers import fused_cuda
    from vllm_utils.layers.activation import SiluAndMul
    from vllm_utils.layers.norm import RMSNorm
    from vllm_utils.layers.rotary import RotaryEmbedding

    torch.manual_seed(0)
    x = torch.randn(37, 4096, dtype=torch.bfloat16, device="cuda")
    residual = torch.randn_like(x)
    norm = RMSNorm(4096, 1e-5).cuda()
    norm.weight.data = torch.rand(4096, device="cuda", dtype=torch.bfloat16)
    expected_residual = residual + x
    res_fused = residual.clone()
    fused = fused_cuda.add_rmsnorm(x, norm.weight, 1e-5, res_fused)
    variance = expected_residual.float().pow(2).mean(-1, keepdim=True)
    reference = norm.weight * (expected_residual.float() * torch.rsqrt(variance + 1e-5)).to(torch.bfloat16)
    assert torch.equal(res_fused, expected_residual)
    assert (fused.float() - reference.float()).abs().max().item() <= 2 ** -6 * reference.float().abs().max().item()

    gate_up = torch.randn(37, 2 * 11008, dtype=torch.bfloat16, device="cuda")
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(fused_cuda.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up)

    rotary = RotaryEmbedding(128, 4096, {"rope_type": "default", "rope_theta": 10000.0}).cuda()
    positions = torch.randint(0, 4096, (37,), device="cuda")
    qkv = torch.randn(37, 3 * 4096, dtype=torch.bfloat16, device="cuda")
    q = qkv[:, :4096].view(37, 32, 128)
    cos, sin = rotary.cos[positions].to(q.dtype)[:, None], rotary.sin[positions].to(q.dtype)[:, None]
    from vllm_utils.layers.rotary import rotate_half

    reference = q * cos + rotate_half(q) * sin
    fused_cuda.rope_(q, positions, rotary.cos, rotary.sin)
    assert torch.allclose(q.float(), reference.float(), rtol=2**-7, atol=2**-7)  # at most one bf16 rounding step
