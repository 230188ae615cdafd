"""Hub names whose configuration the package carries (each in the folder of that name here, with where its values
came from: SOURCES.md), so that `--load-format dummy` benchmarks an architecture without any download. No torch import: the
CLI's --help lists them."""
import json
import os

HERE = os.path.dirname(__file__)
BUNDLED = {
    "llava-hf/llava-1.5-7b-hf": "llava-1.5-7b-hf",
    "llava-hf/llava-1.5-13b-hf": "llava-1.5-13b-hf",
    "llava-hf/bakLlava-v1-hf": "bakLlava-v1-hf",
    "llava-hf/llava-interleave-qwen-7b-hf": "llava-interleave-qwen-7b-hf",
    "Intel/llava-gemma-2b": "llava-gemma-2b",
    "xtuner/llava-phi-3-mini-hf": "llava-phi-3-mini-hf",
    "llava-hf/llava-v1.6-mistral-7b-hf": "llava-v1.6-mistral-7b-hf",
    "llava-hf/llava-v1.6-vicuna-7b-hf": "llava-v1.6-vicuna-7b-hf",
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": "llava-onevision-qwen2-0.5b-ov-hf",
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": "llava-onevision-qwen2-7b-ov-hf",
    "llava-hf/LLaVA-NeXT-Video-7B-hf": "LLaVA-NeXT-Video-7B-hf",
    "Qwen/Qwen2-VL-2B-Instruct": "Qwen2-VL-2B-Instruct",
    "Qwen/Qwen2-VL-7B-Instruct": "Qwen2-VL-7B-Instruct",
    "Qwen/Qwen2.5-VL-3B-Instruct": "Qwen2.5-VL-3B-Instruct",
    "Qwen/Qwen2.5-VL-7B-Instruct": "Qwen2.5-VL-7B-Instruct",
    "deepseek-community/deepseek-vl-1.3b-chat": "deepseek-vl-1.3b-chat",
    "deepseek-community/deepseek-vl-7b-base": "deepseek-vl-7b-base",
    "deepseek-community/deepseek-vl-7b-chat": "deepseek-vl-7b-chat",
    "zai-org/GLM-4.1V-9B-Thinking": "GLM-4.1V-9B-Thinking",
    "stepfun-ai/GOT-OCR-2.0-hf": "GOT-OCR-2.0-hf",
    "OpenGVLab/InternVL3-1B-hf": "InternVL3-1B-hf",
    "OpenGVLab/InternVL3-8B-hf": "InternVL3-8B-hf",
    "OpenGVLab/InternVL3_5-1B-HF": "InternVL3_5-1B-HF",
    "Qwen/Qwen3-VL-2B-Instruct": "Qwen3-VL-2B-Instruct",
    "Qwen/Qwen3-VL-4B-Instruct": "Qwen3-VL-4B-Instruct",
    "Qwen/Qwen3-VL-8B-Instruct": "Qwen3-VL-8B-Instruct",
    "Qwen/Qwen3-VL-30B-A3B-Instruct": "Qwen3-VL-30B-A3B-Instruct",
    "Qwen/Qwen3.5-0.8B": "Qwen3.5-0.8B",
    "Qwen/Qwen3.5-4B": "Qwen3.5-4B",
    "Qwen/Qwen3.5-27B": "Qwen3.5-27B",
    "Qwen/Qwen3.5-35B-A3B": "Qwen3.5-35B-A3B",
    "openbmb/MiniCPM-V-4.6": "MiniCPM-V-4.6",
    "google/gemma-3-4b-it": "gemma-3-4b-it",
    "google/gemma-3-27b-it": "gemma-3-27b-it",
}


def bundled_names(model_type: str) -> list[str]:
    """The hub names carried here whose config.json is of `model_type`."""
    names = []
    for name, folder in BUNDLED.items():
        with open(os.path.join(HERE, folder, "config.json")) as f:
            if json.load(f).get("model_type") == model_type:
                names.append(name)
    return names


def bundled_config_dir(model: str) -> str | None:
    """The packaged folder for a known hub name, unless a local folder of that name exists."""
    if model in BUNDLED and not os.path.isdir(model):
        return os.path.join(HERE, BUNDLED[model])
    return None
