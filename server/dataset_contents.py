"""What a dataset folder holds: images with same-named `.txt` captions (the layout
`training.data.dataset.scan_dataset` reads), counted here, and the removal of a folder left empty.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from training.data.dataset import IMAGE_SUFFIXES

CAPTION_SUFFIX = ".txt"


def count_dataset(folder: Path) -> tuple[int, int, int]:
    """(images, captioned images, total bytes) of the files under `folder`, hidden entries skipped."""
    images = captioned = size = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        names = {f for f in files if not f.startswith(".")}
        for name in names:
            path = Path(root) / name
            try:
                size += path.stat().st_size
            except OSError:
                continue  # removed while we counted
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images += 1
                if path.stem + CAPTION_SUFFIX in names:
                    captioned += 1
    return images, captioned, size


def remove_empty_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (someone else wrote there) or already gone
        folder.rmdir()
