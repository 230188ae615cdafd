"""Engine settings and the model's Hugging Face configuration."""
import json
import os
import sys
from dataclasses import dataclass

import torch
from transformers import AutoConfig, PretrainedConfig

from vllm_utils.errors import UserError

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class EngineConfig:
    model: str
    device: str = "cpu"
    dtype: str = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: max(max_model_len, 8192)
    num_kv_blocks: int | None = None  # None: sized from memory
    memory_fraction: float = 0.9  # share of device memory the engine may use (CUDA)
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    seed: int = 0
    load_format: str = "auto"  # "auto" (safetensors) or "dummy" (random weights)
    attention_backend: str = "auto"  # "auto": triton on CUDA if installed, else torch
    max_graph_batch: int = 256  # decode batches up to this size replay CUDA graphs

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise UserError(f"--block-size must be >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.max_num_seqs}")
        if self.tensor_parallel_size < 1:
            raise UserError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.load_format not in ("auto", "dummy"):
            raise UserError(f"--load-format must be 'auto' or 'dummy', got '{self.load_format}'")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UserError(f"unknown --dtype '{self.dtype}': use auto, float32, float16 or bfloat16")


def load_hf_config(model: str) -> PretrainedConfig:
    """The model folder's config.json, read through transformers so that defaults are filled in."""
    from vllm_utils.models.bundled_configs import bundled_config_dir

    folder = bundled_config_dir(model) or model
    if not os.path.isdir(folder):
        hub = " (nothing is downloaded: fetch a Hub model first, e.g. `hf download NAME --local-dir DIR`)"
        raise UserError(f"model folder '{model}' does not exist; give a local folder holding config.json"
                        f"{hub if model.count('/') == 1 and not model.startswith(('/', '.')) else ''}")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"'{model}' has no config.json; give the folder of a Hugging Face model")
    try:
        with open(config_path) as f:
            json.load(f)
        return AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {config_path}: {first_line}") from None


def resolve_dtype(name: str, hf_config: PretrainedConfig, device: torch.device) -> torch.dtype:
    if name != "auto":
        dtype = DTYPES[name]
    else:
        text_config = getattr(hf_config, "text_config", hf_config)
        dtype = getattr(hf_config, "dtype", None) or getattr(text_config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = DTYPES.get(dtype, torch.float32)
    if device.type == "cpu" and dtype == torch.float16:
        # as vLLM's CPU backend does: fp16 matmuls run ~5x slower than bf16 on CPUs (44 vs 9 ms measured)
        if name != "auto":
            print("note: float16 is slow on CPUs; using bfloat16 (same size); --dtype float32 for full precision",
                  file=sys.stderr)
        return torch.bfloat16
    return dtype
