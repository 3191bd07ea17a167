"""Dataset inspection: each defect caught in a crafted dataset, silence on a clean one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from training.data.report import GUIDE_IMAGE_RANGE, inspect_dataset
from training.data.synthetic import COLOURS, SHAPES, draw_shape


def clean_dataset(folder: Path, count: int = 12) -> Path:
    """Distinct shapes with distinct captions, all sharp and well exposed."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    colours = list(COLOURS)
    for i in range(count):
        shape, colour, background = SHAPES[i % 3], colours[i % 5], colours[(i + 2) % 5]
        draw_shape(shape, COLOURS[colour], COLOURS[background], (64, 64), rng).save(folder / f"img{i:02d}.png")
        words = ["tiny", "large", "glossy", "matte", "tilted", "bold", "soft", "rough", "old", "new", "odd", "neat"]
        (folder / f"img{i:02d}.txt").write_text(f"xyz_shape {words[i]} {colour} {shape} on {background}, shot {i}")
    return folder


def report(folder: Path, **options):
    return inspect_dataset(folder, trigger_word="xyz_shape", native_resolution=64, bucket_step=16, **options)


def test_a_clean_dataset_has_no_problems(tmp_path):
    result = report(clean_dataset(tmp_path / "clean"))
    assert result.problems == []
    assert result.images == 12 and result.samples_per_epoch == 12
    assert result.resolution_min == result.resolution_max == [64, 64]
    assert result.buckets == {"64x64": 12} and result.formats == {"png": 12}
    assert result.verdict.startswith("good")


def test_each_defect_is_caught(tmp_path):
    folder = clean_dataset(tmp_path / "bad")
    (folder / "img00.txt").unlink()  # uncaptioned
    (folder / "stray.txt").write_text("xyz_shape a caption without its image")  # orphan caption
    (folder / "img01.txt").write_text("a red circle with no trigger word")  # missing trigger
    with Image.open(folder / "img02.png") as image:
        image.convert("RGB").save(folder / "copy.jpg", quality=90)  # near-duplicate of img02, re-encoded
    sharp = draw_shape("triangle", (250, 250, 250), (120, 40, 40), (64, 64), np.random.default_rng(7))
    sharp.filter(ImageFilter.GaussianBlur(3)).save(folder / "blurred.png")  # blurry
    (folder / "copy.txt").write_text("xyz_shape a copy that says something new entirely")
    (folder / "blurred.txt").write_text("xyz_shape soft focus version of a shape")
    Image.new("RGB", (64, 64), (5, 5, 5)).save(folder / "dark.png")  # badly exposed
    (folder / "dark.txt").write_text("xyz_shape almost black frame")
    draw_shape("circle", (255, 255, 0), (0, 0, 255), (32, 32), np.random.default_rng(1)).save(folder / "small.png")
    (folder / "small.txt").write_text("xyz_shape small thumbnail of a sun")  # below native 64 px
    (folder / "img03.txt").write_text((folder / "img04.txt").read_text().replace(",", " ,"))  # img04's words

    result = report(folder)
    assert result.uncaptioned == ["img00.png"]
    assert result.orphan_captions == ["stray.txt"]
    assert result.missing_trigger == ["img01.png"]
    assert ["copy.jpg", "img02.png"] in [sorted(group) for group in result.near_duplicates]
    assert "blurred.png" in result.blurry and "img02.png" not in result.blurry
    assert result.badly_exposed == ["dark.png"]
    assert result.below_native_resolution == ["small.png"]
    assert ["img03.png", "img04.png"] in [sorted(group) for group in result.similar_captions]
    assert result.formats == {"png": 15, "jpg": 1}
    assert len(result.problems) >= 8


def test_concepts_repeats_and_validation_are_counted(tmp_path):
    folder = tmp_path / "concepts"
    clean_dataset(folder / "10_xyz_cat", 3)
    clean_dataset(folder / "xyz_dog", 2)
    clean_dataset(folder / "validation", 2)
    result = inspect_dataset(folder, native_resolution=64, bucket_step=16)
    counts = {c.folder: (c.trigger_word, c.repeats, c.images, c.samples_per_epoch) for c in result.concepts}
    assert counts == {"10_xyz_cat": ("xyz_cat", 10, 3, 30), "xyz_dog": ("xyz_dog", 1, 2, 2)}
    assert (result.images, result.validation_images, result.samples_per_epoch) == (5, 2, 32)
    assert result.missing_trigger == [f"10_xyz_cat/img0{i}.png" for i in range(3)] + [
        "xyz_dog/img00.png",
        "xyz_dog/img01.png",
    ]


@pytest.mark.parametrize("lora_type", sorted(GUIDE_IMAGE_RANGE))
def test_the_verdict_follows_the_guide_for_each_lora_type(tmp_path, lora_type):
    low, high = GUIDE_IMAGE_RANGE[lora_type]
    result = report(clean_dataset(tmp_path / "d", 12), lora_type=lora_type)
    expected = "good" if low <= 12 <= high else "too few"
    assert result.verdict.startswith(expected) and f"{low}-{high}" in result.verdict
