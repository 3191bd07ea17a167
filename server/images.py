"""Images the server makes: the loss curve (drawn with Pillow: two lines need no plotting library)
and thumbnails of sample and dataset images. Pillow is imported inside the functions: the server
imports this module at start-up, which stays light."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

WIDTH, HEIGHT, MARGIN = 720, 360, 48
SAMPLE_MAX_SIDE = 384  # images in a tool result are downscaled to this so a result of several stays well under 1 MB
LOSS_COLOUR, LR_COLOUR, AXIS_COLOUR = (31, 119, 180), (255, 127, 14), (90, 90, 90)
VALIDATION_COLOUR = (44, 160, 44)


def loss_curve_png(rows: list[dict]) -> bytes:
    """Training loss (blue) and validation loss (green) on the left scale, learning rate (orange) on
    the right, over steps; `rows` are metrics.jsonl rows (validation rows have kind 'validation')."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN, MARGIN // 2, WIDTH - MARGIN, HEIGHT - MARGIN
    draw.rectangle((left, top, right, bottom), outline=AXIS_COLOUR)
    rows = [r for r in rows if isinstance(r.get("loss"), int | float) and isinstance(r.get("step"), int)]
    validation = [r for r in rows if r.get("kind") == "validation"]
    rows = [r for r in rows if "kind" not in r]
    if not rows:
        draw.text((left + 10, top + 10), "no training steps yet", fill=AXIS_COLOUR)
        return _png(image)
    steps = [r["step"] for r in rows]
    first, last = min(steps), max(steps)
    span = max(1, last - first)

    def x(step: int) -> float:
        return left + (step - first) / span * (right - left)

    losses = [(r["step"], float(r["loss"])) for r in rows]
    checked = [(r["step"], float(r["loss"])) for r in validation if first <= r["step"] <= last]
    lrs = [(r["step"], float(r["lr"])) for r in rows if isinstance(r.get("lr"), int | float)]
    loss_range = _value_range(losses + checked)
    lines = [
        ("loss", losses, loss_range, LOSS_COLOUR, left + 4),
        ("validation", checked, loss_range, VALIDATION_COLOUR, left + 4),
        ("lr", lrs, _value_range(lrs), LR_COLOUR, right - 110),
    ]
    for label_row, (key, values, (low, high), colour, anchor) in enumerate(lines):
        if not values:
            continue
        scale = (high - low) or 1.0
        points = [(x(s), bottom - (v - low) / scale * (bottom - top)) for s, v in values]
        if len(points) == 1:
            points.append(points[0])
        draw.line(points, fill=colour, width=2)
        draw.text((anchor, top + 4 + 12 * (label_row % 2)), f"{key} {low:.3g}..{high:.3g}", fill=colour)
    draw.text((left, bottom + 8), f"step {first}", fill=AXIS_COLOUR)
    draw.text((right - 80, bottom + 8), f"step {last}", fill=AXIS_COLOUR)
    return _png(image)


def _value_range(values: list[tuple[int, float]]) -> tuple[float, float]:
    return (min(v for _, v in values), max(v for _, v in values)) if values else (0.0, 1.0)


def thumbnail_png(path: Path) -> bytes:
    """An image scaled to at most SAMPLE_MAX_SIDE, as PNG bytes."""
    from training.image_files import upright_image

    with upright_image(path) as image:
        image.thumbnail((SAMPLE_MAX_SIDE, SAMPLE_MAX_SIDE))
        return _png(image.convert("RGB"))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
