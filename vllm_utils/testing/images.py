"""Generated pictures: the demo's default image and test fixtures where no photo is at hand."""
import numpy as np
from PIL import Image


def make_demo_image(path: str, size: tuple[int, int] = (320, 240), seed: int = 0) -> str:
    """A colourful synthetic picture (gradient plus a few discs)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 128)], axis=-1).astype(np.float32)
    for _ in range(4):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(15, 60)
        image[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    Image.fromarray(image.astype(np.uint8)).save(path)
    return path
