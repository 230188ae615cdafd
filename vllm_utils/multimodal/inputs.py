"""How multimodal data travels from the processor to the model."""
import torch

# Named tensors (e.g. "pixel_values"), each item's rows concatenated along dim 0 in prompt order, across the items
# of a prompt and the prompts of a step.
MultiModalInputs = dict[str, torch.Tensor]


def concat_mm_inputs(parts: list[MultiModalInputs]) -> MultiModalInputs:
    """The items of several prompts, in order, as one batch."""
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]} if parts else {}
