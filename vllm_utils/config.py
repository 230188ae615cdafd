"""The engine's settings as the user gives them (`EngineConfig`), the same resolved against the model once
(`ResolvedConfig`), and reading a model folder's Hugging Face configuration."""
import json
import os
from dataclasses import dataclass, field

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PretrainedConfig

from vllm_utils import envs
from vllm_utils.bundled import bundled_config_dir
from vllm_utils.errors import UserError
from vllm_utils.remote_code import refuse_remote_code

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192


@dataclass
class EngineConfig:
    model: str
    device: str = "cpu"
    dtype: str = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    max_num_seqs: int | None = None  # None: DEFAULT_MAX_NUM_SEQS
    # tokens computed per step; below max_model_len, prompts are prefilled in chunks with decodes mixed in.
    # None: max(max_model_len, DEFAULT_MAX_NUM_BATCHED_TOKENS), whole prompts
    max_num_batched_tokens: int | None = None
    num_kv_blocks: int | None = None  # None: sized from memory
    memory_fraction: float = 0.9  # share of device memory the engine may use (accelerators)
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    seed: int = 0
    load_format: str = "auto"  # "auto" (safetensors) or "dummy" (random weights)
    attention_backend: str = "auto"  # "auto": the device's best; "torch": the pure-PyTorch reference
    max_graph_batch: int = 256  # decode batches up to this size replay CUDA graphs
    cpu_kernels: bool = field(default_factory=envs.cpu_kernels)  # our C kernels for bf16 on CPUs
    # CPU: fewer threads while other processes hold cores (platforms/cpu_team.py)
    cpu_follow_load: bool = field(default_factory=envs.cpu_follow_load)
    triton_gemv: bool = field(default_factory=envs.triton_gemv)  # single-row linears on CUDA in Triton
    max_logprobs: int = 20  # the most log-probs a request may ask per position (vLLM's; -1: no limit)
    mm_processor_kwargs: dict | None = None  # settings of the model's HF processor (vLLM's), checked by the family
    # prompts start after their longest cached prefix of full KV blocks (engine/prefix_cache.py). None: on where it
    # is exact (not for models with a recurrent state, which the blocks do not hold)
    enable_prefix_caching: bool | None = None

    def __post_init__(self) -> None:
        if self.seed is None:  # vLLM's LLM(seed=None)
            self.seed = 0
        if self.block_size < 1:
            raise UserError(f"--block-size must be >= 1, got {self.block_size}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise UserError(f"--max-num-batched-tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.tensor_parallel_size < 1:
            raise UserError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.load_format not in ("auto", "dummy"):
            raise UserError(f"--load-format must be 'auto' or 'dummy', got '{self.load_format}'")
        if self.mm_processor_kwargs is not None and not isinstance(self.mm_processor_kwargs, dict):
            raise UserError(f"mm_processor_kwargs must be a dict, got {self.mm_processor_kwargs!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UserError(f"unknown --dtype '{self.dtype}': use auto, float32, float16 or bfloat16")


@dataclass(frozen=True)
class ResolvedConfig:
    """An EngineConfig resolved against the model's configuration, once (engine/resolve.py): what the engine,
    the tensor-parallel workers and the HF reference backend all read."""

    engine: EngineConfig
    model_type: str  # the registry's name of the model family
    folder: str  # where config, processor files and weights are read
    hf_config: PretrainedConfig
    device: torch.device  # rank 0's
    dtype: torch.dtype
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    prefix_caching: bool = False


def is_hub_name(model: str) -> bool:
    return model.count("/") == 1 and not model.startswith(("/", ".", "~")) and not os.path.exists(model)


def cached_snapshot(model: str) -> str | None:
    """The folder of a hub model's snapshot in the local Hugging Face cache (`hf download NAME`), if it is there;
    never a download."""
    if not is_hub_name(model):
        return None
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, local_files_only=True)
    except Exception:  # not in the cache (or a name the hub would refuse): the caller says so
        return None


def model_folder(model: str) -> str:
    """Where a model's files are read: a local folder as given; a hub name from the local Hugging Face cache, else
    (its configuration only, for random weights) from the configurations the package carries."""
    if not is_hub_name(model):
        return model
    return cached_snapshot(model) or bundled_config_dir(model) or model


def load_hf_config(model: str) -> PretrainedConfig:
    """The model folder's config.json, read through transformers so that defaults are filled in."""
    folder = model_folder(model)
    if os.path.isfile(folder):
        raise UserError(f"--model '{model}' is a file; give the model's folder (the one holding config.json)")
    if not os.path.isdir(folder):
        hub = (" or a hub name already in the local Hugging Face cache (nothing is downloaded here: fetch it first "
               f"with `hf download {model}`)") if is_hub_name(model) else ""
        raise UserError(f"model folder '{model}' does not exist; give a local folder holding config.json{hub}")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"'{model}' has no config.json; give the folder of a Hugging Face model")
    try:
        with open(config_path) as f:
            data = json.load(f)
        if isinstance(data, dict):
            refuse_remote_code(data, model)
        return AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError, TypeError, StrictDataclassError) as e:
        # transformers' own validation names the field: keep its words, in one line
        words = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"cannot read {config_path}: {words}") from None


def checkpoint_dtype(hf_config: PretrainedConfig) -> torch.dtype:
    text_config = getattr(hf_config, "text_config", hf_config)
    dtype = getattr(hf_config, "dtype", None) or getattr(text_config, "dtype", None) or torch.float32
    return DTYPES.get(dtype, torch.float32) if isinstance(dtype, str) else dtype
