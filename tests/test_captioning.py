"""Automatic captions: the offline template, and a real image-to-text model (tiny, random) end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from server.captions import caption_now, plan_captions
from server.errors import ServiceError
from training.data.synthetic import make_shape_dataset


def run(workspace: Path, **options):
    values = dict(
        dataset_name="d",
        dataset_path=None,
        caption_model="template",
        trigger_word="xyz_shape",
        overwrite=False,
        prefix="",
        suffix="",
    )
    on_progress = options.pop("on_progress", None)
    values.update(options)
    return caption_now(plan_captions(workspace, **values), values["caption_model"], on_progress=on_progress)


def test_template_captions_follow_the_guide(tmp_path):
    folder = tmp_path / "datasets" / "d"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 96), (200, 0, 0)).save(folder / "red_sports_car_01.png")
    Image.new("RGB", (64, 64), (0, 0, 200)).save(folder / "IMG_0042.png")
    (folder / "10_xyz_mug").mkdir()
    Image.new("RGB", (96, 64), (0, 200, 0)).save(folder / "10_xyz_mug" / "0001.png")
    progress = []
    result = run(
        tmp_path, suffix=", product photography", on_progress=lambda done, total: progress.append((done, total))
    )
    captions = {f.file: f.caption for f in result.files}
    assert captions["red_sports_car_01.png"] == (
        "xyz_shape red sports car, detailed, high quality, portrait composition, product photography"
    )
    assert captions["IMG_0042.png"].startswith("xyz_shape subject, detailed")
    assert captions["10_xyz_mug/0001.png"].startswith("xyz_shape xyz mug, detailed, high quality, wide composition")
    assert (folder / "red_sports_car_01.txt").read_text().strip() == captions["red_sports_car_01.png"]
    assert progress[-1] == (3, 3)


def test_existing_captions_are_kept_unless_overwrite(tmp_path):
    folder = tmp_path / "datasets" / "d"
    make_shape_dataset(folder, 2, trigger_word="xyz_shape")
    before = (folder / "shape_000.txt").read_text()
    assert run(tmp_path).captioned == 0
    assert (folder / "shape_000.txt").read_text() == before
    result = run(tmp_path, overwrite=True, trigger_word="xyz_new")
    assert result.captioned == 2 and (folder / "shape_000.txt").read_text().startswith("xyz_new shape")


def test_a_real_captioning_model_runs_end_to_end(tmp_path, tiny_git):
    folder = tmp_path / "datasets" / "d"
    make_shape_dataset(folder, 3)
    for caption in folder.glob("*.txt"):
        caption.unlink()
    result = run(tmp_path, caption_model=str(tiny_git), prefix="photo of")
    assert result.captioned == 3
    for item in result.files:
        assert item.caption.startswith("xyz_shape photo of")
        assert (folder / item.file).with_suffix(".txt").read_text().strip() == item.caption


def test_models_that_are_not_here_say_what_to_do(tmp_path):
    make_shape_dataset(tmp_path / "datasets" / "d", 1)
    with pytest.raises(ServiceError, match="huggingface-cli download Salesforce/blip2-opt-2.7b"):
        run(tmp_path, caption_model="blip2", overwrite=True)
    with pytest.raises(ServiceError, match="huggingface-cli download florence-community/Florence-2-large"):
        run(tmp_path, caption_model="florence2", overwrite=True)
    with pytest.raises(ServiceError, match="either dataset_name"):
        run(tmp_path, dataset_path="x")
    with pytest.raises(ServiceError, match="not allowed"):
        run(tmp_path, dataset_name="../etc")
