"""Checkpoints that exist on the hub only in their authors' remote-code format (a `model_type` transformers does not
define, run by Python files shipped in the folder): refused by name when their config.json is read, with the
transformers-format checkpoint of the same line to use instead."""
from vllm_utils.errors import UserError

# model_type -> (the models of that format, what to use instead)
REMOTE_CODE_FORMATS = {
    "chatglm": ("GLM-4V-9B (THUDM/glm-4v-9b)", "zai-org/GLM-4.1V-9B-Thinking (--model-type glm4v)"),
    "deepseek_vl_v2": ("DeepSeek-VL2", "deepseek-community/deepseek-vl-7b-chat (--model-type deepseek_vl_hybrid) "
                                       "or deepseek-community/deepseek-vl-1.3b-chat (--model-type deepseek_vl)"),
    "multi_modality": ("DeepSeek-VL (deepseek-ai/deepseek-vl-*)",
                       "its conversion deepseek-community/deepseek-vl-7b-chat (--model-type deepseek_vl_hybrid) or "
                       "deepseek-community/deepseek-vl-1.3b-chat (--model-type deepseek_vl)"),
    "internvl_chat": ("InternVL (OpenGVLab/InternVL3-*, InternVL3_5-* without -hf)",
                      "its transformers-format conversion, e.g. OpenGVLab/InternVL3-1B-hf (--model-type internvl)"),
    "minicpmv": ("MiniCPM-V 2.x", "no MiniCPM-V checkpoint in the transformers format is supported yet; "
                                  "llava-hf/llava-onevision-qwen2-7b-ov-hf is a supported model of its size"),
    "phi3_v": ("Phi-3-Vision / Phi-3.5-Vision", "xtuner/llava-phi-3-mini-hf (--model-type llava), the Phi-3 "
                                                "decoder in the transformers LLaVA format"),
    "qwen": ("Qwen-VL (Qwen/Qwen-VL-Chat)", "Qwen/Qwen2-VL-7B-Instruct or Qwen/Qwen2.5-VL-7B-Instruct "
                                           "(--model-type qwen2_vl / qwen2_5_vl)"),
}
# the original LLaVA repository's format (Yi-VL, liuhaotian/llava-v1.5-*): model_type "llava", its own layout
_ORIGINAL_LLAVA = ("the original LLaVA code's format (e.g. Yi-VL, liuhaotian/llava-v1.5-*)",
                   "a checkpoint converted to the transformers LLaVA format, such as llava-hf/llava-1.5-7b-hf")


def refuse_remote_code(config: dict, model: str) -> None:
    """A one-line refusal where config.json names a remote-code format."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type in REMOTE_CODE_FORMATS:
        what, instead = REMOTE_CODE_FORMATS[model_type]
    elif model_type == "llava" and ("mm_vision_tower" in config or "LlavaLlamaForCausalLM" in architectures):
        what, instead = _ORIGINAL_LLAVA
    else:
        return
    arch = f" ({', '.join(architectures)})" if architectures else ""
    raise UserError(f"'{model}' holds a '{model_type}' model{arch}: {what}, in the hub's remote-code format "
                    f"(Python files in the folder, not transformers' own model), which this tool does not run; use "
                    f"{instead}")
