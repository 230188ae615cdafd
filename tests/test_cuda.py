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
    for req, out in zip(reqs, outputs):
        assert out.outputs[0].token_ids == hf_reference.greedy(req, 24)


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_decode_step_does_not_wait_for_the_gpu(tiny_llava, images, enforce_eager):
    """A decode step only launches work: the one GPU->CPU sync is the sampler reading the tokens."""
    llm = LLM(tiny_llava, device="cuda", dtype="bfloat16", max_model_len=512, enforce_eager=enforce_eager)
    engine = llm.engine
    prompt = engine.processor.chat_prompt("Describe the picture.")
    engine.add_request(prompt, [images[0]], SamplingParams(temperature=0, max_tokens=8))
    engine.step()  # the prefill
    step = engine.scheduler.schedule()
    assert not step.is_prefill
    inputs = engine.runner.prepare(step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, greedy = engine.runner.execute(inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (greedy is not None) == (not enforce_eager)  # graph mode computes the argmax in the graph
