"""A generated example dataset (coloured shapes with captions), for the demo and the tests,
where no real images can be downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
}
SHAPES = ("circle", "square", "triangle")


def make_shape_dataset(
    folder: Path, count: int, *, trigger_word: str | None = None, size: tuple[int, int] = (64, 64), seed: int = 0
) -> list[Path]:
    """Write `count` PNG images with same-named .txt captions into `folder`; returns the images."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    paths = []
    for index in range(count):
        shape = SHAPES[index % len(SHAPES)]
        colour, background = rng.choice(len(names), size=2, replace=False)
        image = draw_shape(shape, COLOURS[names[colour]], COLOURS[names[background]], size, rng)
        path = folder / f"shape_{index:03d}.png"
        image.save(path)
        caption = f"a {names[colour]} {shape} on a {names[background]} background, flat colours, centered"
        path.with_suffix(".txt").write_text(f"{trigger_word} {caption}" if trigger_word else caption, encoding="utf-8")
        paths.append(path)
    return paths


def draw_shape(shape: str, colour, background, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    radius = min(width, height) * float(rng.uniform(0.2, 0.4))
    cx, cy = width / 2 + float(rng.uniform(-0.1, 0.1)) * width, height / 2 + float(rng.uniform(-0.1, 0.1)) * height
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    return image
