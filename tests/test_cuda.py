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
