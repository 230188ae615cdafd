"""Model types and architectures -> model classes. A new VLM is one file plus one line here."""
from transformers import PretrainedConfig
from torch import nn

from vllm_utils.errors import UserError
from vllm_utils.models.llava import LlavaForConditionalGeneration

# --model-type name -> (the config model_types it accepts, class)
MODEL_TYPES: dict[str, tuple[tuple[str, ...], type[nn.Module]]] = {
    "llava": (("llava",), LlavaForConditionalGeneration),
}


def check_model_type(model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown --model-type '{model_type}': supported: {', '.join(sorted(MODEL_TYPES))}")


def model_class(hf_config: PretrainedConfig, model_type: str | None, model_path: str) -> type[nn.Module]:
    found = getattr(hf_config, "model_type", None)
    archs = ", ".join(getattr(hf_config, "architectures", None) or []) or "unknown architecture"
    for name, (config_types, cls) in MODEL_TYPES.items():
        if found in config_types and model_type in (None, name):
            return cls
    wanted = model_type or " or ".join(sorted(MODEL_TYPES))
    raise UserError(f"'{model_path}' holds a '{found}' model ({archs}), not a {wanted} model; "
                    f"point --model at a {wanted} checkpoint folder")
