"""Configuration values the engine does not implement are refused by name, in one line, before anything loads:
never run as if they were something else."""
import copy
import json

import pytest

from vllm_utils.benchmark_vision_language import main


def _rope(kind: str, **extra) -> dict:
    return {"rope_parameters": {"rope_type": kind, "rope_theta": 10000.0, **extra}}


# name -> (the change to the tiny LLaVA's config.json, words the error must contain)
REFUSED = {
    "text model type": ({"text_config": {"model_type": "gemma2"}}, "text_config.model_type 'gemma2'"),
    "vision model type": ({"vision_config": {"model_type": "dinov2"}}, "vision_config.model_type 'dinov2'"),
    "text hidden_act": ({"text_config": {"hidden_act": "gelu_new"}}, "text_config.hidden_act 'gelu_new'"),
    "vision hidden_act": ({"vision_config": {"hidden_act": "gelu_new"}}, "vision_config.hidden_act 'gelu_new'"),
    "projector act": ({"projector_hidden_act": "gelu_fast"}, "projector_hidden_act 'gelu_fast'"),
    "yarn RoPE": ({"text_config": _rope("yarn", factor=2.0)}, "'yarn'"),
    "longrope": ({"text_config": {"model_type": "phi3", **_rope("longrope", short_factor=[1.0] * 8,
                                                                 long_factor=[2.0] * 8),
                                  "original_max_position_embeddings": 1024}}, "'longrope'"),
    "partial rotary": ({"text_config": {"model_type": "phi3", "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    "bidirectional gemma": ({"text_config": {"model_type": "gemma", "use_bidirectional_attention": True}},
                            "use_bidirectional_attention"),
    "feature strategy": ({"vision_feature_select_strategy": "cls_patch"}, "vision_feature_select_strategy"),
    "quantized": ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
                  "quantization_config"),
}


def _merge(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in change.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) and key != "rope_parameters" else value
    return out


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_config_values_are_refused_in_one_line(case, tiny_llava, tmp_path, capsys):
    change, words = REFUSED[case]
    with open(f"{tiny_llava}/config.json") as f:
        config = _merge(json.load(f), change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    code = main(["--perf", f"--model={tmp_path}", "--load-format=dummy", "--device=cpu", "--input-len=64",
                 "--output-len=2"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and "Traceback" not in err
    assert len(errors) == 1 and words in errors[0], err


@pytest.mark.parametrize("config, words", [
    ({"model_type": "chatglm", "architectures": ["ChatGLMModel"]}, "zai-org/GLM-4.1V-9B-Thinking"),
    ({"model_type": "deepseek_vl_v2", "architectures": ["DeepseekVLV2ForCausalLM"]}, "deepseek-community/"),
    ({"model_type": "minicpmv", "architectures": ["MiniCPMV"]}, "no MiniCPM-V checkpoint"),
    ({"model_type": "phi3_v", "architectures": ["Phi3VForCausalLM"]}, "xtuner/llava-phi-3-mini-hf"),
    ({"model_type": "qwen", "architectures": ["QWenLMHeadModel"]}, "Qwen/Qwen2-VL-7B-Instruct"),
    ({"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"], "mm_vision_tower": "./vit/clip"},
     "llava-hf/llava-1.5-7b-hf"),
])
def test_remote_code_checkpoints_are_refused_with_the_checkpoint_to_use(config, words, tmp_path, capsys):
    """The vendor tool's remote-code entries: the format named, and the transformers-format model to use."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    code = main(["--perf", f"--model={tmp_path}", "--load-format=dummy", "--device=cpu", "--input-len=64",
                 "--output-len=2"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and "Traceback" not in err and len(errors) == 1, err
    assert f"'{config['model_type']}' model" in errors[0] and "remote-code format" in errors[0] and words in errors[0]
