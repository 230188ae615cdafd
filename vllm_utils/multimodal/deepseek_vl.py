"""DeepSeek-VL's processor adapter: every image is resized (longest side) and padded to SigLIP's square and takes one
prompt position per SigLIP patch; the hybrid's processor also makes SAM's high-resolution square of the same
image (`high_res_pixel_values`)."""
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.multimodal.processor import ProcessorAdapter

SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")


class DeepseekVLProcessorAdapter(ProcessorAdapter):
    image_token = "<image_placeholder>"

    @staticmethod
    def config_image_token_id(hf_config) -> int:
        return hf_config.image_token_id

    def item_positions(self, mm_inputs: MultiModalInputs) -> list[int]:
        pixels = mm_inputs["pixel_values"]  # [images, channels, height, width]
        patch = self.hf_config.vision_config.patch_size
        return [(pixels.shape[2] // patch) * (pixels.shape[3] // patch)] * pixels.shape[0]

    def fallback_image_processor(self):
        """Resize the longest side and pad to the tower's square, OpenAI CLIP's mean and std (the hub's files)."""
        size = self.hf_config.vision_config.image_size
        high_res = getattr(self.hf_config, "high_res_vision_config", None)
        if high_res is None:
            from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil

            return DeepseekVLImageProcessorPil(size={"height": size, "width": size})
        from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import (
            DeepseekVLHybridImageProcessorPil)

        return DeepseekVLHybridImageProcessorPil(size={"height": size, "width": size},
                                                 high_res_size={"height": high_res.image_size,
                                                                "width": high_res.image_size})

    def fallback_chat_prompt(self, text: str, num_images: int, num_videos: int = 0) -> str:
        return f"{SYSTEM_PROMPT}\n\nUser: {self.image_token * num_images}{text}\n\nAssistant:"
