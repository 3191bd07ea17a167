"""A phone photo stored landscape with EXIF orientation 6 (shown portrait) is seen upright everywhere
an image is read: the dataset scan and its buckets, the training pixels, the dataset report, the
server's thumbnails and upload check, and the sample-copy check's thumbnails."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

STORED = (96, 64)  # (width, height) of the pixels in the file
SHOWN = (64, 96)  # as a viewer shows them


def gradient(size: tuple[int, int], *, along_width: bool) -> Image.Image:
    """Dark to bright along one axis, red at the dark end: which way it runs tells how the image was turned."""
    width, height = size
    ramp = np.linspace(0, 255, width if along_width else height, dtype=np.float32)
    values = np.broadcast_to(ramp[None, :] if along_width else ramp[:, None], (height, width))
    pixels = np.stack([np.full_like(values, 200), values, values], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def phone(tmp_path) -> Path:
    """The stored pixels run dark -> bright left to right; turned 90 degrees clockwise for display
    (orientation 6), they run dark -> bright top to bottom."""
    folder = tmp_path / "data"
    folder.mkdir()
    image = gradient(STORED, along_width=True)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(folder / "phone.jpg", quality=95, exif=exif.tobytes())
    (folder / "phone.txt").write_text("xyz_shape a photo")
    return folder / "phone.jpg"


def runs_top_to_bottom(pixels: np.ndarray) -> bool:
    """(height, width, channels) pixels that brighten downwards and not across."""
    green = pixels[..., 1].astype(np.float32)
    return green[-1].mean() - green[0].mean() > 100 and abs(green[:, -1].mean() - green[:, 0].mean()) < 20


def test_the_dataset_its_buckets_and_the_training_pixels_see_the_photo_upright(phone):
    from training.data.buckets import assign_bucket, make_buckets
    from training.data.dataset import scan_dataset
    from training.data.images import load_pixels

    [record] = scan_dataset(phone.parent, trigger_word="xyz_shape", trigger_words={}).images
    assert record.size == SHOWN
    bucket = assign_bucket(record.size, make_buckets(64, 16), 16)
    assert bucket[0] < bucket[1]  # a portrait bucket
    pixels = load_pixels(phone, bucket, random_crop=False, flip=False, rng=np.random.default_rng(0))
    assert pixels.shape[1:] == (bucket[1], bucket[0])
    assert runs_top_to_bottom(((pixels.permute(1, 2, 0).numpy() + 1) * 127.5))


def test_the_dataset_report_sees_the_photo_upright(phone):
    from training.data.report import inspect_dataset

    # The same picture saved upright without EXIF: a near-duplicate only if the photo is turned first.
    gradient(SHOWN, along_width=False).save(phone.parent / "copy.png")
    report = inspect_dataset(phone.parent, trigger_word="xyz_shape", native_resolution=64, bucket_step=16)
    assert report.resolution_min == list(SHOWN) and report.resolution_max == list(SHOWN)
    assert all(int(w) < int(h) for w, h in (key.split("x") for key in report.buckets))
    assert report.near_duplicates == [["copy.png", "phone.jpg"]]


def test_the_servers_thumbnail_and_upload_check_see_the_photo_upright(phone):
    from server.image_checks import checked_image
    from server.images import thumbnail_png

    with Image.open(io.BytesIO(thumbnail_png(phone))) as preview:
        assert preview.width < preview.height
        assert runs_top_to_bottom(np.asarray(preview.convert("RGB")))
    assert checked_image("phone.jpg", phone.read_bytes()) == SHOWN


def test_the_sample_copy_check_compares_the_photo_upright(phone):
    from training.run_evidence import thumbnail

    assert runs_top_to_bottom(thumbnail(phone) * 255)
