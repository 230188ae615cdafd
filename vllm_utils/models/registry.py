"""Model families: the --model-type name, the HF config model_types it accepts, its model class (with the family's
hooks: config checks, tensor-parallel widths, ...), its processor adapter (tokens, tensors, HF's model inputs), and
the builder of its tiny random checkpoint (the demo's default model of the family). A new family is one model file,
one processor adapter, a tiny builder and one entry here."""
from dataclasses import dataclass

from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.models.deepseek_vl import DeepseekVLForConditionalGeneration, DeepseekVLHybridForConditionalGeneration
from vllm_utils.models.gemma3 import Gemma3ForConditionalGeneration
from vllm_utils.models.glm4v import Glm4vForConditionalGeneration
from vllm_utils.models.got_ocr2 import GotOcr2ForConditionalGeneration
from vllm_utils.models.interface import VisionLanguageModel
from vllm_utils.models.internvl import InternVLForConditionalGeneration
from vllm_utils.models.llava import LlavaForConditionalGeneration
from vllm_utils.models.llava_next import LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration
from vllm_utils.models.llava_next_video import LlavaNextVideoForConditionalGeneration
from vllm_utils.models.minicpmv import MiniCPMV4_6ForConditionalGeneration, MiniCPMV4_7ForConditionalGeneration
from vllm_utils.models.qwen2_vl import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from vllm_utils.models.qwen3_5 import Qwen3_5ForConditionalGeneration
from vllm_utils.models.qwen3_5_moe import Qwen3_5MoeForConditionalGeneration
from vllm_utils.models.qwen3_vl import Qwen3VLForConditionalGeneration
from vllm_utils.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration
from vllm_utils.multimodal.deepseek_vl import DeepseekVLProcessorAdapter
from vllm_utils.multimodal.gemma3 import Gemma3ProcessorAdapter
from vllm_utils.multimodal.glm4v import Glm4vProcessorAdapter
from vllm_utils.multimodal.got_ocr2 import GotOcr2ProcessorAdapter
from vllm_utils.multimodal.internvl import InternVLProcessorAdapter
from vllm_utils.multimodal.llava import LlavaProcessorAdapter
from vllm_utils.multimodal.llava_next import (LlavaNextProcessorAdapter, LlavaNextVideoProcessorAdapter,
                                              LlavaOnevisionProcessorAdapter)
from vllm_utils.multimodal.minicpmv import MiniCPMV4_7ProcessorAdapter, MiniCPMVProcessorAdapter
from vllm_utils.multimodal.processor import ProcessorAdapter
from vllm_utils.multimodal.qwen2_vl import Qwen2VLProcessorAdapter
from vllm_utils.multimodal.qwen3_vl import Qwen3VLProcessorAdapter


@dataclass(frozen=True)
class ModelFamily:
    config_types: tuple[str, ...]
    model: type[VisionLanguageModel]
    processor: type[ProcessorAdapter]
    # "module:function" writing a tiny random checkpoint of the family to a folder (imported only when called)
    tiny_builder: str


_LLAVA, _QWEN = "vllm_utils.testing.tiny_llava", "vllm_utils.testing.tiny_qwen"
_DEEPSEEK = "vllm_utils.testing.tiny_deepseek_vl"
MODEL_FAMILIES: dict[str, ModelFamily] = {
    "llava": ModelFamily(("llava",), LlavaForConditionalGeneration, LlavaProcessorAdapter, f"{_LLAVA}:demo_llava"),
    "llava_next": ModelFamily(("llava_next",), LlavaNextForConditionalGeneration, LlavaNextProcessorAdapter,
                              f"{_LLAVA}:demo_llava_next"),
    "llava_onevision": ModelFamily(("llava_onevision",), LlavaOnevisionForConditionalGeneration,
                                   LlavaOnevisionProcessorAdapter, f"{_LLAVA}:demo_llava_onevision"),
    "llava_next_video": ModelFamily(("llava_next_video",), LlavaNextVideoForConditionalGeneration,
                                    LlavaNextVideoProcessorAdapter, f"{_LLAVA}:demo_llava_next_video"),
    "qwen2_vl": ModelFamily(("qwen2_vl",), Qwen2VLForConditionalGeneration, Qwen2VLProcessorAdapter,
                            f"{_QWEN}:demo_qwen2_vl"),
    "qwen2_5_vl": ModelFamily(("qwen2_5_vl",), Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessorAdapter,
                              f"{_QWEN}:demo_qwen2_5_vl"),
    "glm4v": ModelFamily(("glm4v",), Glm4vForConditionalGeneration, Glm4vProcessorAdapter,
                         "vllm_utils.testing.tiny_glm4v:demo_glm4v"),
    "deepseek_vl": ModelFamily(("deepseek_vl",), DeepseekVLForConditionalGeneration, DeepseekVLProcessorAdapter,
                               f"{_DEEPSEEK}:demo_deepseek_vl"),
    "deepseek_vl_hybrid": ModelFamily(("deepseek_vl_hybrid",), DeepseekVLHybridForConditionalGeneration,
                                      DeepseekVLProcessorAdapter, f"{_DEEPSEEK}:demo_deepseek_vl_hybrid"),
    "got_ocr2": ModelFamily(("got_ocr2",), GotOcr2ForConditionalGeneration, GotOcr2ProcessorAdapter,
                            "vllm_utils.testing.tiny_got_ocr2:demo_got_ocr2"),
    "internvl": ModelFamily(("internvl",), InternVLForConditionalGeneration, InternVLProcessorAdapter,
                            "vllm_utils.testing.tiny_internvl:demo_internvl"),
    "qwen3_vl": ModelFamily(("qwen3_vl",), Qwen3VLForConditionalGeneration, Qwen3VLProcessorAdapter,
                            "vllm_utils.testing.tiny_qwen3_vl:demo_qwen3_vl"),
    "qwen3_vl_moe": ModelFamily(("qwen3_vl_moe",), Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessorAdapter,
                                "vllm_utils.testing.tiny_qwen3_vl_moe:demo_qwen3_vl_moe"),
    "qwen3_5": ModelFamily(("qwen3_5",), Qwen3_5ForConditionalGeneration, Qwen3VLProcessorAdapter,
                           "vllm_utils.testing.tiny_qwen3_5:demo_qwen3_5"),
    "qwen3_5_moe": ModelFamily(("qwen3_5_moe",), Qwen3_5MoeForConditionalGeneration, Qwen3VLProcessorAdapter,
                               "vllm_utils.testing.tiny_qwen3_5_moe:demo_qwen3_5_moe"),
    "minicpmv4_6": ModelFamily(("minicpmv4_6",), MiniCPMV4_6ForConditionalGeneration, MiniCPMVProcessorAdapter,
                               "vllm_utils.testing.tiny_minicpmv:demo_minicpmv"),
    "minicpmv4_7": ModelFamily(("minicpmv4_7",), MiniCPMV4_7ForConditionalGeneration, MiniCPMV4_7ProcessorAdapter,
                               "vllm_utils.testing.tiny_minicpmv:demo_minicpmv4_7"),
    "gemma3": ModelFamily(("gemma3",), Gemma3ForConditionalGeneration, Gemma3ProcessorAdapter,
                          "vllm_utils.testing.tiny_gemma3:demo_gemma3"),
}
# model_types transformers defines that no family serves, refused with the reason
UNSUPPORTED_TYPES = {
    "paligemma": "PaliGemma is not supported: its Gemma 2 decoder needs attention logit soft-capping and a prefix-LM "
                 "mask over the prompt, which this engine does not implement (Gemma 3, --model-type gemma3, is "
                 "supported)",
}


def video_families() -> list[str]:
    return [name for name, f in MODEL_FAMILIES.items() if f.processor.video_token is not None]


def check_model_type(model_type: str) -> None:
    if model_type not in MODEL_FAMILIES:
        raise UserError(f"unknown --model-type '{model_type}': supported: {', '.join(sorted(MODEL_FAMILIES))}")


def find_family(hf_config: PretrainedConfig, model_type: str | None, model_path: str) -> str:
    """The registry name of the family that serves this config (and matches `model_type` when given)."""
    if model_type is not None:
        check_model_type(model_type)
    found = getattr(hf_config, "model_type", None)
    archs = ", ".join(getattr(hf_config, "architectures", None) or []) or "unknown architecture"
    for name, family in MODEL_FAMILIES.items():
        if found in family.config_types and model_type in (None, name):
            return name
    if found in UNSUPPORTED_TYPES:
        raise UserError(f"'{model_path}' holds a '{found}' model ({archs}): {UNSUPPORTED_TYPES[found]}")
    names = list(MODEL_FAMILIES)
    wanted = model_type or ", ".join(names[:-1]) + " or " + names[-1]
    if any(found in f.config_types for f in MODEL_FAMILIES.values()):
        raise UserError(f"--model-type {model_type} does not match '{model_path}', which holds a '{found}' model "
                        f"({archs}); leave --model-type out (the folder's config decides) or pass --model-type {found}")
    raise UserError(f"'{model_path}' holds a '{found}' model ({archs}), not a {wanted} model; "
                    f"point --model at a checkpoint folder of {'that family' if model_type else 'one of those'}")


def family(name: str) -> ModelFamily:
    return MODEL_FAMILIES[name]
