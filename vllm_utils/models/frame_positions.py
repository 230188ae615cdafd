"""Multimodal RoPE positions counted frame by frame, as transformers' `get_rope_index` counts them for GLM-4.1V and
Qwen3-VL: a text token's three rows (time, height, width) are equal; each frame of each item (an image is one
frame, a video's temporal patches each one, its time written as text before it) is a grid of merged positions from
where it starts, its time row constant; the text after it resumes from that start plus the grid's larger side."""
import torch

from vllm_utils.errors import UserError


def frame_positions(is_mm: list[bool], grid_thw: torch.Tensor | None, merge: int,
                    max_positions: int) -> tuple[torch.Tensor, int]:
    """The prompt's position rows [3, tokens] and the offset of the tokens after it (position = index + offset).
    `is_mm` marks the items' positions; `grid_thw` [items, 3] gives each item's patch grid, `merge` the patches a
    position merges along a side."""
    frames = [(h // merge, w // merge) for t, h, w in (grid_thw.tolist() if grid_thw is not None else [])
              for _ in range(t)]
    parts, start, i, frame = [], 0, 0, 0
    while i < len(is_mm):
        if not is_mm[i]:
            end = next((j for j in range(i, len(is_mm)) if is_mm[j]), len(is_mm))
            parts.append(torch.arange(start, start + end - i).expand(3, -1))
            start, i = start + end - i, end
            continue
        h, w = frames[frame]
        grid = torch.stack(torch.meshgrid(torch.tensor([start]), torch.arange(h) + start, torch.arange(w) + start,
                                          indexing="ij")).flatten(1)
        parts.append(grid)
        start += max(h, w)
        i += grid.shape[1]
        frame += 1
    positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
    if positions.numel() and int(positions.max()) >= max_positions:
        raise UserError(f"the prompt's positions reach {int(positions.max())}, beyond the model's "
                        f"max_position_embeddings ({max_positions}); use fewer or smaller images or videos")
    return positions, int(positions.max()) + 1 - len(is_mm) if len(is_mm) else 0
