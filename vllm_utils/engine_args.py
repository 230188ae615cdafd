"""`LLM(...)`'s keywords as vLLM names them -> this engine's `EngineConfig` fields. A name that means something here
is mapped; one that changes nothing here (logging, swap space) is accepted; one whose setting this
engine does not implement is refused by name unless left at vLLM's default; an unknown name is refused."""
from dataclasses import fields
from typing import Any

from vllm_utils.config import EngineConfig
from vllm_utils.errors import UserError

RENAMED = {"gpu_memory_utilization": "memory_fraction", "num_gpu_blocks_override": "num_kv_blocks"}
# accepted at any value: they change how vLLM runs, not what it computes, or do not apply to this engine
ACCEPTED = ("trust_remote_code", "disable_log_stats", "swap_space", "tokenizer_mode",
            "max_seq_len_to_capture", "disable_custom_all_reduce", "compilation_config", "generation_config",
            "allowed_local_media_path", "limit_mm_per_prompt", "enable_chunked_prefill", "task", "runner")
# refused unless at vLLM's default: settings this engine does not implement
DEFAULTS: dict[str, Any] = {
    "tokenizer": None, "revision": None, "tokenizer_revision": None, "code_revision": None, "quantization": None,
    "kv_cache_dtype": "auto", "cpu_offload_gb": 0, "hf_overrides": None,
    "skip_tokenizer_init": False, "speculative_config": None, "enable_lora": False, "pipeline_parallel_size": 1,
    "distributed_executor_backend": None, "rope_scaling": None, "rope_theta": None, "override_pooler_config": None,
    "download_dir": None,
}
_WHY = {"tokenizer": "a tokenizer other than the model folder's", "download_dir": "the cache folder is "
        "HF_HUB_CACHE's (set it in the environment)"}
OURS = {f.name for f in fields(EngineConfig)} - {"model"}


def engine_config(model: str, kwargs: dict[str, Any]) -> tuple[EngineConfig, dict[str, Any]]:
    """The engine's configuration, and the accepted options the API itself reads (e.g. limit_mm_per_prompt)."""
    ours, options = {}, {}
    if kwargs.get("device") == "auto":
        from vllm_utils.platforms import default_device

        kwargs = {**kwargs, "device": default_device()}
    if not isinstance(kwargs.get("dtype", "auto"), str):  # a torch.dtype, as vLLM takes too
        kwargs = {**kwargs, "dtype": str(kwargs["dtype"]).removeprefix("torch.")}
    for name, value in kwargs.items():
        if name in OURS:
            ours[name] = value
        elif name in RENAMED:
            ours[RENAMED[name]] = value
        elif name in ACCEPTED:
            options[name] = value
        elif name in DEFAULTS:
            if value != DEFAULTS[name] and not (name == "tokenizer" and value == model):
                why = f" ({_WHY[name]})" if name in _WHY else ""
                raise UserError(f"LLM({name}={value!r}) is not supported here{why}; leave it at {DEFAULTS[name]!r}")
        else:
            raise UserError(f"LLM() has no engine argument '{name}'")
    if "memory_fraction" in ours and not 0 < ours["memory_fraction"] <= 1:
        raise UserError(f"gpu_memory_utilization must be in (0, 1], got {ours['memory_fraction']}")
    return EngineConfig(model=model, **ours), options
