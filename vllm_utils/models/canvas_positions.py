"""MiniCPM-V 4.7's canvas M-RoPE: a prompt's three position rows (time, height, width) as transformers'
`MiniCPMV4_7Model.get_rope_index` lays them out. Text counts on in all three rows. Each picture or video frame (its
thumbnail, then the slices that tile it) is laid on one 2-D canvas from where it starts (its time row constant):
with slices the canvas is their grid (rows x columns of the first slice's size), each slice placed at its cell and the
thumbnail stretched over the whole canvas (`linspace`, rounded); without, the canvas is the thumbnail's own grid. The
markers around the crops are pinned to it: `<image>` just outside its top-left corner, `</image>` at its far corner,
each `<slice>` / `</slice>` at its slice's top-left / bottom-right, the newline that ends a row of slices just past
the row's right edge, and the markers and newlines after a frame's last crop at its origin. Frames separated by
markers only (a video's) form one group: text between two of them counts on one step further. The next text
resumes after the canvas's larger side."""
import itertools
from dataclasses import dataclass

import torch

from vllm_utils.errors import UserError


@dataclass(frozen=True)
class CanvasMarkers:
    """Token ids of the markers around the crops (the config's image_start_id, ... newline_id)."""
    image_start: int
    image_end: int
    slice_start: int
    slice_end: int
    newline: int

    def ids(self) -> frozenset[int]:
        return frozenset((self.image_start, self.image_end, self.slice_start, self.slice_end, self.newline))


@dataclass
class _Frame:
    thumb: tuple[int, int]  # the thumbnail's token span [start, end)
    slices: list[tuple[int, int]]  # its slices' spans, row-major
    end: int = 0  # one past the markers that close it


def _groups(ids: list[int], kinds: list[int], markers: CanvasMarkers) -> list[tuple[int, list[_Frame]]]:
    """(index of the `<image>` opening it, its frames) per group, in order. Each run of one kind of item token is a
    crop: a slice where `<slice>` precedes it (after a thumbnail), else a new frame's thumbnail."""
    marker_ids = markers.ids()
    groups: list[tuple[int, list[_Frame]]] = []
    frame, previous_end = None, 0
    for kind, run in itertools.groupby(range(len(ids)), lambda i: kinds[i]):
        if not kind:
            continue
        run = list(run)
        crop = (run[0], run[-1] + 1)
        if frame is not None and ids[crop[0] - 1] == markers.slice_start:
            frame.slices.append(crop)
        else:
            frame = _Frame(crop, [])
            if groups and all(t in marker_ids for t in ids[previous_end:crop[0] - 1]):
                groups[-1][1].append(frame)
            else:
                groups.append((crop[0] - 1, [frame]))
        previous_end = crop[1]
    for _, frames in groups:
        for f in frames:
            f.end = (f.slices[-1] if f.slices else f.thumb)[1]
            while f.end < len(ids) and ids[f.end] in marker_ids:
                f.end += 1
    return groups


def _grid(origin: int, size: tuple[int, int], merge: int, span: tuple[int, int] | None = None,
          offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """[3, h * w] rows of a crop of `size` patches (h x w positions after merging), row-major: its rows and columns
    spread over `span` (height, width) of the canvas (its own grid where a side is 0), from `offset`."""
    h, w = size[0] // merge, size[1] // merge
    span_h, span_w = span or (0, 0)
    span_h, span_w = span_h or h, span_w or w
    rows = torch.linspace(0, span_h - 1, h).round().long() + offset[0]
    cols = torch.linspace(0, span_w - 1, w).round().long() + offset[1]
    grid_h, grid_w = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([torch.zeros_like(grid_h), grid_h, grid_w]).reshape(3, -1) + origin


def _columns(slices: list[tuple[int, int]]) -> tuple[int, int]:
    """(rows, columns) of a frame's slices: a row ends where more than `</slice><slice>` lies between two."""
    cols = next((k + 1 for k in range(len(slices) - 1) if slices[k + 1][0] - slices[k][1] > 2), len(slices))
    rows = len(slices) // cols
    return (rows, cols) if rows * cols == len(slices) else (1, len(slices))


def _place(pos: torch.Tensor, span: tuple[int, int], rows: torch.Tensor) -> None:
    if span[1] - span[0] != rows.shape[1]:
        raise UserError(f"a crop of {span[1] - span[0]} positions where its size gives {rows.shape[1]}: the prompt's "
                        f"tokens do not match its items")
    pos[:, span[0]:span[1]] = rows


def canvas_positions(ids: list[int], kinds: list[int], sizes: list[tuple[int, int]], markers: CanvasMarkers,
                     merge: int, max_positions: int) -> tuple[torch.Tensor, int]:
    """The prompt's rows [3, tokens] and the offset of the tokens after it (position = index + offset). `kinds`:
    per token 0 (text), 1 (an image's position) or 2 (a video's); `sizes`: every crop's (height, width) in patches,
    in prompt order; `merge`: the patches a position merges along a side."""
    n = len(ids)
    pos = torch.arange(n).expand(3, -1).clone()
    sizes_left = iter(sizes)
    start = done = 0  # the next text position; the tokens laid out so far
    for group_start, frames in _groups(ids, kinds, markers):
        if group_start > done:  # text before it
            pos[:, done:group_start] = torch.arange(group_start - done) + start
            start += group_start - done
        cursor = group_start
        for frame in frames:
            thumb = next(sizes_left)
            frame_start = frame.thumb[0] - 1
            if frame_start > cursor:  # text between two frames of a group
                pos[:, cursor:frame_start] = torch.arange(frame_start - cursor) + start
                start += frame_start - cursor + 1
            end, origin = frame.end, start
            rows = cols = slice_h = slice_w = 0
            canvas = (thumb[0] // merge, thumb[1] // merge)
            if frame.slices:
                rows, cols = _columns(frame.slices)
                slice_sizes = [next(sizes_left) for _ in frame.slices]
                slice_h, slice_w = slice_sizes[0][0] // merge, slice_sizes[0][1] // merge
                canvas = (rows * slice_h, cols * slice_w)
            pos[:, frame_start:end] = origin
            pos[1:, frame_start] = max(origin - 1, 0)
            if frame.thumb[1] < end:
                pos[1:, frame.thumb[1]] = torch.tensor(canvas) + origin
            _place(pos, frame.thumb, _grid(origin, thumb, merge, canvas))
            for k, (span, size) in enumerate(zip(frame.slices, slice_sizes if frame.slices else [])):
                offset = ((k // cols) * slice_h, (k % cols) * slice_w)
                if span[0] - 1 >= frame_start:
                    pos[1:, span[0] - 1] = torch.tensor(offset) + origin
                if span[1] < end:
                    pos[1:, span[1]] = torch.tensor([offset[0] + size[0] // merge, offset[1] + size[1] // merge]) \
                        + origin - 1
                _place(pos, span, _grid(origin, size, merge, offset=offset))
            for k in range(len(frame.slices) - 1):  # the newline ending a row: past the row's right edge
                gap = (frame.slices[k][1] + 1, frame.slices[k + 1][0] - 1)
                if gap[1] - gap[0] > 0:
                    pos[1, gap[0]:gap[1]] = origin + (k // cols + 1) * slice_h - 1
                    pos[2, gap[0]:gap[1]] = origin + cols * slice_w
            start = origin + max(canvas) + 1
            cursor = end
        done = cursor
    pos[:, done:] = torch.arange(n - done) + start
    if n and int(pos.max()) >= max_positions:
        raise UserError(f"the prompt's positions reach {int(pos.max())}, beyond the model's max_position_embeddings "
                        f"({max_positions}); use fewer or smaller images or videos")
    return pos, int(pos.max()) + 1 - n if n else 0
