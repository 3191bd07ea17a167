"""Opening an image file the way it is meant to be seen.

Phone cameras store a portrait photo as landscape pixels plus an EXIF Orientation tag; a viewer
turns it, and so must every reader here (captioning, previews, reports, training), or a caption
describes a sideways picture and a bucket is picked for the wrong aspect. PIL only, no torch: the
MCP server imports this too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from PIL import ExifTags, Image, ImageOps


@contextmanager
def upright_image(source: str | Path | IO[bytes]) -> Iterator[Image.Image]:
    """The image with its EXIF orientation applied (and the tag dropped); the file is closed on exit."""
    with Image.open(source) as image:
        yield ImageOps.exif_transpose(image)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is seen, from the header alone: orientations 5-8 swap the sides."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else image.size
