"""EngineConfig + the model's HF config -> ResolvedConfig, once, before anything is built: every check that needs
only the configuration runs here, so that bad input fails before minutes of loading."""
from vllm_utils.config import (DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS, DTYPES, EngineConfig,
                               ResolvedConfig, checkpoint_dtype, load_hf_config, model_folder)
from vllm_utils.bundled import bundled_config_dir
from vllm_utils.errors import UserError
from vllm_utils.models.registry import family as model_family
from vllm_utils.models.registry import find_family
from vllm_utils.platforms import platform_for, resolve_device


def resolve(config: EngineConfig, model_type: str | None = None) -> ResolvedConfig:
    device = resolve_device(config.device)
    hf_config = load_hf_config(config.model)
    folder = model_folder(config.model)
    if config.load_format != "dummy" and folder == bundled_config_dir(config.model):
        raise UserError(f"'{config.model}' is a Hugging Face Hub name that is not in the local cache, and nothing is "
                        f"downloaded here: fetch it first (`hf download {config.model}`), or run its architecture "
                        f"with random weights (load_format='dummy'; on the command line --load-format dummy)")
    family = find_family(hf_config, model_type, config.model)
    if getattr(hf_config, "quantization_config", None):  # every family: only unquantized weights load
        raise UserError("quantization_config is set: quantized checkpoints are not supported; use the unquantized "
                        "model")
    model_family(family).model.check_config(hf_config)
    explicit = config.dtype != "auto"
    dtype = platform_for(device).resolve_dtype(DTYPES[config.dtype] if explicit else checkpoint_dtype(hf_config),
                                               explicit)
    longest = hf_config.text_config.max_position_embeddings
    max_model_len = config.max_model_len or longest
    if max_model_len > longest:
        raise UserError(f"--max-model-len {max_model_len} exceeds the model's max_position_embeddings ({longest}); "
                        f"lower it")
    if max_model_len < 2:
        raise UserError(f"--max-model-len must be >= 2, got {max_model_len}")
    resolved = ResolvedConfig(
        engine=config, model_type=family, folder=folder,
        hf_config=hf_config, device=device, dtype=dtype, max_model_len=max_model_len,
        max_num_seqs=config.max_num_seqs or DEFAULT_MAX_NUM_SEQS,
        # a budget below the longest sequence prefills prompts in chunks
        max_num_batched_tokens=config.max_num_batched_tokens or max(DEFAULT_MAX_NUM_BATCHED_TOKENS, max_model_len),
        prefix_caching=prefix_caching(config, hf_config),
    )
    check_tensor_parallel(resolved)
    return resolved


def prefix_caching(config: EngineConfig, hf_config) -> bool:
    """Whether prompts may start after a cached prefix: asked, or by default, where the KV blocks hold all a prefix
    leaves behind (a model with linear-attention layers also leaves a recurrent state, which they do not)."""
    recurrent = "linear_attention" in (getattr(hf_config.text_config, "layer_types", None) or [])
    if recurrent and config.enable_prefix_caching:
        raise UserError("prefix caching is not supported for models with linear-attention layers (their recurrent "
                        "state is not cached with the KV blocks); leave it off (drop --enable-prefix-caching or "
                        "enable_prefix_caching=True)")
    return not recurrent and config.enable_prefix_caching is not False


def check_tensor_parallel(config: ResolvedConfig) -> None:
    """Errors a user can fix, before any process starts."""
    size = config.engine.tensor_parallel_size
    if size == 1:
        return
    platform = platform_for(config.device)
    if platform.dist_backend is None:
        raise UserError(f"--tensor-parallel-size > 1 is not supported on {config.device.type}; use 1")
    for what, count in model_family(config.model_type).model.tensor_parallel_widths(config.hf_config).items():
        if count % size:
            raise UserError(f"--tensor-parallel-size {size} does not divide {what} ({count}); pick a divisor of {count}")
    if platform.max_ranks() is not None and platform.max_ranks() < size:
        raise UserError(f"--tensor-parallel-size {size} needs {size} {config.device.type} devices but "
                        f"{platform.max_ranks()} are visible; lower it or expose more devices")
