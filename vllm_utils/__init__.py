"""vllm_utils: validate and benchmark vision-language models on any PyTorch device."""
from typing import TYPE_CHECKING

from vllm_utils.threads import configure_openmp

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

configure_openmp()  # before torch loads libgomp, which reads its settings once

if TYPE_CHECKING:
    from vllm_utils.llm import LLM, RequestOutput
    from vllm_utils.sampling_params import SamplingParams


def __getattr__(name: str):
    """The API on first use, so that `python -m vllm_utils.benchmark_vision_language --help` need not
    import torch."""
    if name in ("LLM", "RequestOutput"):
        from vllm_utils import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from vllm_utils.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'vllm_utils' has no attribute '{name}'")
