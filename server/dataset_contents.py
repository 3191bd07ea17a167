"""What a dataset folder holds: images with same-named `.txt` captions (the layout
`training.data.dataset.scan_dataset` reads), counted here, and the removal of a folder left empty.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from training.data.dataset import IMAGE_SUFFIXES

CAPTION_SUFFIX = ".txt"


def count_dataset(folder: Path) -> tuple[int, int, int]:
    """(images, captioned images, total bytes) of the files under `folder`, hidden entries skipped."""
    images = captioned = size = 0
    for path in dataset_files(folder):
        try:
            size += path.stat().st_size
        except OSError:
            continue  # removed while we counted
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images += 1
            if path.with_suffix(CAPTION_SUFFIX).is_file():
                captioned += 1
    return images, captioned, size


def dataset_files(folder: Path) -> Iterator[Path]:
    """The files under `folder` (linked folders not followed), hidden files and folders skipped, by folder."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield from (Path(root) / name for name in sorted(files) if not name.startswith("."))


def remove_empty_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (someone else wrote there) or already gone
        folder.rmdir()
