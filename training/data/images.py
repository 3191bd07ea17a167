"""Turning an image file into the pixel tensor of its bucket."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.data.buckets import Bucket
from training.image_files import upright_image


def load_pixels(path: Path, bucket: Bucket, *, random_crop: bool, flip: bool, rng: np.random.Generator) -> torch.Tensor:
    """Resize to cover the bucket (aspect kept), crop to it, optionally mirror.

    Returns a float tensor of shape (3, height, width) in [-1, 1], the VAE's input range.
    """
    width, height = bucket
    with upright_image(path) as image:
        image = image.convert("RGB")
        resized = covering_size(image.size, bucket)
        if resized != image.size:
            image = image.resize(resized, Image.Resampling.LANCZOS)
        left, top = crop_top_left(image.size, bucket, random_crop=random_crop, rng=rng)
        image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    pixels = torch.from_numpy(array).permute(2, 0, 1)
    return pixels.flip(-1) if flip else pixels


def covering_size(size: tuple[int, int], bucket: Bucket) -> tuple[int, int]:
    """The (width, height) an image of `size` is resized to so that it covers the bucket, aspect kept."""
    width, height = bucket
    scale = max(width / size[0], height / size[1])
    return max(width, round(size[0] * scale)), max(height, round(size[1] * scale))


def crop_top_left(
    resized: tuple[int, int], bucket: Bucket, *, random_crop: bool, rng: np.random.Generator | None
) -> tuple[int, int]:
    """(left, top) of the bucket-sized crop of an image resized to `resized`: centred, or drawn from `rng`
    (two draws). SDXL is told these, as its crop conditioning."""
    spare_x, spare_y = resized[0] - bucket[0], resized[1] - bucket[1]
    if random_crop:
        return int(rng.integers(0, spare_x + 1)), int(rng.integers(0, spare_y + 1))
    return spare_x // 2, spare_y // 2
