"""LLaVA-NeXT-Video (HF `LlavaNextVideoForConditionalGeneration`): LLaVA-NeXT's images, and videos whose frames go
through the tower, are pooled (`spatial_pool_mode` average or max, `spatial_pool_stride`) on their feature grid,
then through the projector; the frames' features follow one another, with no newline."""
import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from vllm_utils.errors import UserError
from vllm_utils.models.llava_next import LlavaNextForConditionalGeneration

POOLS = {"average": F.avg_pool2d, "max": F.max_pool2d}


class LlavaNextVideoForConditionalGeneration(LlavaNextForConditionalGeneration):
    @staticmethod
    def check_config(config: PretrainedConfig) -> None:
        LlavaNextForConditionalGeneration.check_config(config)
        if config.spatial_pool_mode not in POOLS:
            raise UserError(f"spatial_pool_mode '{config.spatial_pool_mode}' is not supported (supported: "
                            f"{', '.join(POOLS)})")
        if not isinstance(config.spatial_pool_stride, int) or config.spatial_pool_stride < 1:
            raise UserError(f"spatial_pool_stride {config.spatial_pool_stride!r} is not a positive integer")

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.pool, self.stride = POOLS[config.spatial_pool_mode], config.spatial_pool_stride

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        states = self.vision_tower(frames, self.feature_layers)
        features = torch.cat(states, dim=-1)
        if self.strategy == "default":
            features = features[:, 1:]
        side = self.vision_config.image_size // self.vision_config.patch_size
        grid = features.view(len(frames), side, side, -1).permute(0, 3, 1, 2)
        pooled = self.pool(grid, kernel_size=self.stride, stride=self.stride).flatten(2).transpose(1, 2)
        return self.multi_modal_projector(pooled).flatten(0, 1)
