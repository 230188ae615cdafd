"""vllm_utils: validate and benchmark vision-language models on any PyTorch device."""
from vllm_utils.llm import LLM, RequestOutput
from vllm_utils.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
