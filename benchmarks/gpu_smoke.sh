#!/usr/bin/env bash
# On the lent GPU machine, in one `run` call: the CUDA tests (CUDA graphs, Triton kernels compiled for the
# GPU, graph and eager against HF), then a dummy-weight 7B perf run at batch 1 in graph mode.
# Then, one call each: `python3 benchmarks/gpu_gemv.py` and `python3 benchmarks/gpu_bench.py`.
set -x
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
python3 -m pytest -q -rf tests/test_cuda.py tests/test_triton_kernels.py tests/test_matches_hf.py 2>&1 | tail -25
python3 -m vllm_utils.benchmark_vision_language --perf --model llava-hf/llava-1.5-7b-hf --load-format dummy \
  --device cuda --dtype bfloat16 --max-model-len 4096 --input-len 600 --output-len 128 --num-prompts 1 --batch-size 1 \
  --block-size 16 2>&1 | grep -v "Processed prompts"
