"""Llama 4's image processing in PIL and numpy (transformers' ``Llama4ImageProcessor`` needs torchvision).

The same algorithm as transformers 5.x ``models/llama4/image_processing_llama4.py`` (``_preprocess``):

1. the canvases: every ``(h, w)`` tile grid with ``h * w <= max_patches``, times the tile ``size``
   (``find_supported_resolutions``, in its order);
2. the best canvas (``get_best_fit``): the smallest scale >= 1 that fits the image without distortion, else
   the largest scale < 1; ties: the smallest area (scales in float32, as torch divides int tensors);
3. without ``resize_to_max_canvas`` the target is limited to ``max(image side, size)`` per side, the image is
   resized to fit it keeping its aspect ratio (``get_max_res_without_distortion``), bilinear, and padded with
   zeros on the right and bottom to the canvas;
4. rescale by ``rescale_factor`` and normalise with ``image_mean`` / ``image_std`` **in bfloat16** (its
   ``rescale_and_normalize`` override), then split into tiles row by row (``split_to_tiles``);
5. with more than one tile, a global tile (the whole image resized to ``size``) is appended.

``pixel_values`` come out as float32 holding the bfloat16 values (the models cast them to their own dtype).
One difference: the resize is PIL's bilinear, where transformers uses torchvision's antialiased bilinear
(modelled on PIL's; the two can differ by a grey level on a downscale).
"""

from __future__ import annotations

import math
from typing import Any

from transformers.image_processing_base import BatchFeature, ImageProcessingMixin


def supported_canvases(max_patches: int, size: int) -> list[tuple[int, int]]:
    """Every tile grid of at most ``max_patches`` tiles, grouped by aspect ratio as transformers orders them."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for chunks in range(max_patches, 0, -1):
        for h in sorted(f for f in range(1, chunks + 1) if chunks % f == 0):
            by_ratio.setdefault(h / (chunks // h), []).append((h, chunks // h))
    return [(h * size, w * size) for grids in by_ratio.values() for h, w in grids]


def best_canvas(height: int, width: int, canvases: list[tuple[int, int]], to_max: bool) -> tuple[int, int]:
    """transformers' ``get_best_fit`` on one image size."""
    import numpy as np

    res = np.array(canvases, dtype=np.int64)  # [N,2]
    scales = np.minimum(res[:, 0].astype(np.float32) / np.float32(height),
                        res[:, 1].astype(np.float32) / np.float32(width))  # [N]
    up = scales[scales >= 1]
    chosen = (up.max() if to_max else up.min()) if len(up) else scales[scales < 1].max()
    fits = res[scales == chosen]
    best = fits[int(np.argmin(fits[:, 0] * fits[:, 1]))]
    return int(best[0]), int(best[1])


def fit_without_distortion(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """transformers' ``get_max_res_without_distortion``: ``(height, width)`` scaled into ``target``."""
    scale_w, scale_h = target[1] / width, target[0] / height
    if scale_w < scale_h:
        return max(min(math.floor(height * scale_w), target[0]), 1), max(target[1], 1)
    return max(target[0], 1), max(min(math.floor(width * scale_h), target[1]), 1)


class Llama4Tiler(ImageProcessingMixin):
    """Tiles images as ``Llama4ImageProcessor`` does: ``pixel_values [tiles, 3, size, size]`` for all images
    (each image's tiles, then its global tile when it has more than one) and ``aspect_ratios [images, 2]``."""

    model_input_names = ["pixel_values"]

    def __init__(self, size: dict[str, int] | None = None, max_patches: int = 16, resize_to_max_canvas: bool = False,
                 image_mean: list[float] | None = None, image_std: list[float] | None = None,
                 rescale_factor: float = 1 / 255, **kwargs: Any) -> None:
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        self.size = dict(size or {"height": 336, "width": 336})
        if self.size["height"] != self.size["width"]:
            raise ValueError(f"Llama 4 tiles are square; got size {self.size}")
        self.max_patches, self.resize_to_max_canvas = int(max_patches), bool(resize_to_max_canvas)
        self.image_mean = list(image_mean or [0.5, 0.5, 0.5])
        self.image_std = list(image_std or [0.5, 0.5, 0.5])
        self.rescale_factor = float(rescale_factor)

    def __call__(self, images: Any, return_tensors: Any = None, **kwargs: Any) -> BatchFeature:
        import torch
        from transformers.image_utils import make_flat_list_of_images

        tiles, ratios = [], []
        for image in make_flat_list_of_images(images):
            t, ratio = self.tile(image)
            tiles.append(t)
            ratios.append(ratio)
        data = {"pixel_values": torch.cat(tiles).float(), "aspect_ratios": torch.tensor(ratios)}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def tile(self, image: Any) -> tuple[Any, tuple[int, int]]:
        """One PIL image (or HWC uint8 array) -> (tiles ``[n, 3, size, size]`` bfloat16, (ratio_h, ratio_w))."""
        import torch
        from PIL import Image

        image = (image if isinstance(image, Image.Image) else Image.fromarray(image)).convert("RGB")
        size = self.size["height"]
        h, w = image.height, image.width
        canvas = best_canvas(h, w, supported_canvases(self.max_patches, size), self.resize_to_max_canvas)
        limit = canvas if self.resize_to_max_canvas else (min(max(h, size), canvas[0]), min(max(w, size), canvas[1]))
        new_h, new_w = fit_without_distortion(h, w, limit)
        padded = self._pixels(image.resize((new_w, new_h), Image.BILINEAR), canvas)  # [3,H,W]
        rh, rw = canvas[0] // size, canvas[1] // size
        tiles = padded.view(3, rh, size, rw, size).permute(1, 3, 0, 2, 4).reshape(rh * rw, 3, size, size)
        if rh * rw > 1:
            whole = self._pixels(image.resize((size, size), Image.BILINEAR), (size, size))
            tiles = torch.cat([tiles, whole[None]])
        return tiles, (rh, rw)

    def _pixels(self, image: Any, canvas: tuple[int, int]) -> Any:
        """RGB image -> ``[3, canvas]`` zero-padded right and bottom, rescaled and normalised in bfloat16."""
        import numpy as np
        import torch

        array = np.zeros((canvas[0], canvas[1], 3), np.uint8)
        array[:image.height, :image.width] = np.asarray(image, np.uint8)
        x = torch.from_numpy(array).permute(2, 0, 1).to(torch.bfloat16) * self.rescale_factor  # [3,H,W]
        mean = torch.tensor(self.image_mean, dtype=torch.bfloat16)[:, None, None]
        std = torch.tensor(self.image_std, dtype=torch.bfloat16)[:, None, None]
        return (x - mean) / std
