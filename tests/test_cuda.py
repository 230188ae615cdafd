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
    for backend in (TorchPagedAttention(), TritonPagedAttention()):
        k_cache, v_cache = caches[0].clone(), caches[1].clone()
        outputs.append((backend.forward(q, k, v, k_cache, v_cache, meta, dim**-0.5).float(), k_cache, v_cache))
    (ref, k_ref, v_ref), (out, k_out, v_out) = outputs
    assert torch.equal(k_ref, k_out) and torch.equal(v_ref, v_out)  # the same slots written
    assert ((out - ref).norm() / ref.norm()).item() < (1e-2 if dtype != torch.float32 else 1e-3)
