"""LLaVA-1.5's processor adapter: every image is resized to the tower's square input and takes one prompt position
per patch (plus CLIP's class token, less the first token with the "default" feature strategy)."""
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.multimodal.processor import ProcessorAdapter


class LlavaProcessorAdapter(ProcessorAdapter):
    def item_positions(self, mm_inputs: MultiModalInputs) -> list[int]:
        pixels = mm_inputs["pixel_values"]  # [images, channels, height, width]
        vision = self.hf_config.vision_config
        tokens = (pixels.shape[2] // vision.patch_size) * (pixels.shape[3] // vision.patch_size)
        tokens += vision.model_type == "clip_vision_model"  # CLIP's class token
        return [tokens - (self.hf_config.vision_feature_select_strategy == "default")] * pixels.shape[0]

    def fallback_image_processor(self):
        """CLIP preprocessing at the tower's input size (OpenAI CLIP's mean and std)."""
        from transformers import CLIPImageProcessor

        size = self.hf_config.vision_config.image_size
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    def fallback_chat_prompt(self, text: str, num_images: int, num_videos: int = 0) -> str:
        items = f"{self.image_token}\n" * num_images + f"{self.video_token}\n" * num_videos
        return f"USER: {items}{text} ASSISTANT:"
