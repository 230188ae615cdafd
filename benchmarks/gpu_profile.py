"""Where a decode step's GPU time goes: LLaVA-1.5-7B (bundled config, random weights, bf16), batch 1,
eager, under torch.profiler. Prints the top kernels and the GPU time per step.

    PYTHONPATH=. python3 benchmarks/gpu_profile.py [--prefill]
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from vllm_utils import LLM, SamplingParams
from vllm_utils.modes.synthetic import synthetic_requests

llm = LLM("llava-hf/llava-1.5-7b-hf", load_format="dummy", device="cuda", dtype="bfloat16", max_model_len=4096,
          max_num_seqs=1, enforce_eager=True, enable_prefix_caching=False)
req = synthetic_requests(llm.engine.processor, 600, 2, None, seed=0)
prompts = [r.as_prompt() for r in req]
steps = 1 if "--prefill" in sys.argv else 16
llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    llm.generate(prompts[1:], SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True), use_tqdm=False)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
