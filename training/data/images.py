"""Turning an image file into the pixel tensor of its bucket."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from training.data.buckets import Bucket


def load_pixels(path: Path, bucket: Bucket, *, random_crop: bool, flip: bool, rng: np.random.Generator) -> torch.Tensor:
    """Resize to cover the bucket (aspect kept), crop to it, optionally mirror.

    Returns a float tensor of shape (3, height, width) in [-1, 1], the VAE's input range.
    """
    width, height = bucket
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        scale = max(width / image.width, height / image.height)
        resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        if resized != image.size:
            image = image.resize(resized, Image.Resampling.LANCZOS)
        spare_x, spare_y = image.width - width, image.height - height
        if random_crop:
            left, top = int(rng.integers(0, spare_x + 1)), int(rng.integers(0, spare_y + 1))
        else:
            left, top = spare_x // 2, spare_y // 2
        image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    pixels = torch.from_numpy(array).permute(2, 0, 1)
    return pixels.flip(-1) if flip else pixels
