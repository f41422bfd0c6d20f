"""Synthetic images for verify and the tests: deterministic, of different content, no files needed."""

from __future__ import annotations

from typing import Any


def synthetic_images(width: int = 48, height: int = 40) -> list[Any]:
    """Two RGB PIL images: a colour gradient and a black-and-white checkerboard."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    gradient = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    checker = (((x // 8) + (y // 8)) % 2 * 255)[..., None].repeat(3, axis=-1)
    return [Image.fromarray(a.astype(np.uint8), "RGB") for a in (gradient, checker)]
