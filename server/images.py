"""Images the server puts in tool results and resources: thumbnails of sample and dataset images, each
encoded as PNG or JPEG (whichever is smaller), within a budget per result. Pillow is imported inside the
functions: the server imports this module at start-up, which stays light. The charts are server/charts.py."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from mcp.server.mcpserver.utilities.types import Image as ImageBlock

if TYPE_CHECKING:
    from PIL import Image

SAMPLE_MAX_SIDE = 384  # images in a tool result are downscaled to this
JPEG_QUALITY = 85
# Base64 characters of images in one tool result, or in one image resource. Claude Desktop refuses a result
# over about 1 MB. Issue 16's numbers: a photo-like 384 px sample is ~176 KB as PNG and ~18 KB as JPEG
# (quality 85), so five samples of real photos as PNG came to ~1.2 MB of base64; 700 KB leaves room for the
# text and JSON around the images, and holds ~25 photo-like JPEG thumbnails (or three of random noise, the
# worst case).
RESULT_IMAGE_BUDGET = 700_000


class EncodedImage(NamedTuple):
    data: bytes
    format: str  # "png" or "jpeg": the MIME subtype


def base64_size(data: bytes) -> int:
    """How many characters `data` takes as base64, as a tool result carries it."""
    return 4 * ((len(data) + 2) // 3)


def thumbnail_png(path: Path) -> bytes:
    """An image scaled to at most SAMPLE_MAX_SIDE, as PNG bytes (the dataset image resources)."""
    return encoded(_thumbnail(path), "png")


def smallest_encoding(image: Image.Image) -> EncodedImage:
    """The image as PNG and as JPEG (quality JPEG_QUALITY), the smaller kept: JPEG for photographs (about
    a tenth of the PNG), PNG for flat synthetic images (smaller, and without JPEG's ringing at edges)."""
    candidates = [EncodedImage(encoded(image, kind), kind) for kind in ("png", "jpeg")]
    return min(candidates, key=lambda candidate: len(candidate.data))


def images_within_budget(
    images: Sequence[tuple[str, Path]], where_all: str, budget: int = RESULT_IMAGE_BUDGET
) -> list:
    """Tool-result content: each caption then its thumbnail (smallest_encoding), in order, for as long as the
    images' base64 stays within `budget`; an image that would take it over is left out, and a last line says
    which were and `where_all` (where the assistant finds them all)."""
    content: list = []
    left_out: list[str] = []
    used = 0
    for caption, path in images:
        image = smallest_encoding(_thumbnail(path))
        size = base64_size(image.data)
        if used + size > budget:
            left_out.append(caption)
            continue
        used += size
        content += [caption, ImageBlock(data=image.data, format=image.format)]
    if left_out:
        content.append(
            f"{len(left_out)} of {len(images)} images left out to keep this result under {budget // 1000} KB of "
            f"base64 (a chat client refuses a result over about 1 MB): {'; '.join(left_out)}. {where_all}"
        )
    return content


def encoded(image: Image.Image, kind: str) -> bytes:
    """`image` as PNG or JPEG ("png", "jpeg") bytes."""
    buffer = io.BytesIO()
    if kind == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _thumbnail(path: Path) -> Image.Image:
    """The image upright, scaled to at most SAMPLE_MAX_SIDE, in RGB."""
    from training.image_files import upright_image

    with upright_image(path) as image:
        image.thumbnail((SAMPLE_MAX_SIDE, SAMPLE_MAX_SIDE))
        return image.convert("RGB")
