"""LLaVA-1.5's processor adapter: every image is resized to the tower's square input and takes one prompt position
per patch (plus CLS with the "full" feature strategy)."""
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.multimodal.processor import ProcessorAdapter


class LlavaProcessorAdapter(ProcessorAdapter):
    def item_positions(self, mm_inputs: MultiModalInputs) -> list[int]:
        pixels = mm_inputs["pixel_values"]  # [images, channels, height, width]
        patch = self.hf_config.vision_config.patch_size
        cls = self.hf_config.vision_feature_select_strategy == "full"
        return [(pixels.shape[2] // patch) * (pixels.shape[3] // patch) + cls] * pixels.shape[0]

    def fallback_image_processor(self):
        """CLIP preprocessing at the tower's input size (OpenAI CLIP's mean and std)."""
        from transformers import CLIPImageProcessor

        size = self.hf_config.vision_config.image_size
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    def fallback_chat_prompt(self, text: str, num_images: int) -> str:
        return "USER: " + (self.image_token + "\n") * num_images + text + " ASSISTANT:"
