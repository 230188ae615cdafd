"""The geometry of LLaVA-NeXT's "any resolution" images, shared by the processor adapters (how many positions an
image takes) and the models (how its tile features are laid out): the image is resized to the best of a list of
resolutions, cut into tower-sized tiles, and the tiles' feature grid is cropped back to the image's aspect
ratio."""
import math

from transformers.image_processing_utils import select_best_resolution


def tile_grid(image_size: tuple[int, int], pinpoints: list, tile: int) -> tuple[int, int]:
    """(rows, columns) of `tile`-pixel tiles for an image of (height, width) resized to its best resolution."""
    height, width = select_best_resolution(tuple(image_size), pinpoints)
    return height // tile, width // tile


def unpadded_size(grid_height: int, grid_width: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """The feature grid (height, width) with the padding that fitted the image into it removed: the image was
    resized to touch the grid on one side and centred on the other."""
    height, width = image_size
    if width / height > grid_width / grid_height:
        padding = (grid_height - int(round(height * (grid_width / width), 7))) // 2
        return grid_height - 2 * padding, grid_width
    padding = (grid_width - int(round(width * (grid_height / height), 7))) // 2
    return grid_height, grid_width - 2 * padding


def anyres_max_size(height: int, width: int, max_tiles: int, side: int) -> tuple[int, int] | None:
    """LLaVA-OneVision's `anyres_max_N`: the size a (height, width) feature grid is shrunk to when it holds over
    ~N tiles' worth of features (more than 1.1 times the side of N), else None."""
    ratio = math.sqrt(height * width / (max_tiles * side**2))
    return (int(height // ratio), int(width // ratio)) if ratio > 1.1 else None
