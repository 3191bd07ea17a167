"""Generation with stacked LoRAs at chosen strengths, on the tiny model with LoRAs trained here."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import fast_config
from PIL import Image

from training.generation import GenerationRequest, generate, run_generation_job
from training.generation import LoraStrength as LoraUse
from training.trainer import run_training


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory, tiny_sd15) -> tuple[Path, Path]:
    """LoRA A (UNet only) and LoRA B (UNet and text encoder), trained at a high rate so both move the image."""
    from training.data.synthetic import make_shape_dataset

    root = tmp_path_factory.mktemp("loras")
    data = root / "shapes"
    make_shape_dataset(data, 4, trigger_word="xyz_shape")
    a = run_training(fast_config(data, name="a", steps=3, learning_rate=5e-2, seed=1), root / "a")
    b = run_training(
        fast_config(data, name="b", steps=3, learning_rate=5e-2, seed=2, train_text_encoder=True), root / "b"
    )
    assert a.state == b.state == "completed"
    return a.lora_path, b.lora_path


def pixels(tmp_path: Path, name: str, *loras: LoraUse, **options) -> np.ndarray:
    request = GenerationRequest(
        model_name="builtin:tiny-sd15", prompt="xyz_shape a red circle", steps=2, loras=list(loras), **options
    )
    [path] = generate(request, tmp_path / name)
    return np.asarray(Image.open(path), dtype=np.int16)


def test_a_lora_at_strength_zero_adds_exactly_nothing(tmp_path, two_loras):
    a, b = two_loras
    base = pixels(tmp_path, "base")
    b_alone = pixels(tmp_path, "b", LoraUse(path=str(b), strength_model=0.7))
    stacked = pixels(tmp_path, "ab", LoraUse(path=str(a), strength_model=0.0), LoraUse(path=str(b), strength_model=0.7))
    assert np.abs(b_alone - base).mean() > 1.0  # B changes the image
    assert np.array_equal(stacked, b_alone)
    a_too = pixels(tmp_path, "ab2", LoraUse(path=str(a), strength_model=1.0), LoraUse(path=str(b), strength_model=0.7))
    assert not np.array_equal(a_too, b_alone)  # ...and A does too, when it is on


def test_model_and_clip_strengths_are_separate(tmp_path, two_loras):
    _, b = two_loras
    both = pixels(tmp_path, "both", LoraUse(path=str(b), strength_model=1.0))
    unet_only = pixels(tmp_path, "unet", LoraUse(path=str(b), strength_model=1.0, strength_clip=0.0))
    clip_only = pixels(tmp_path, "clip", LoraUse(path=str(b), strength_model=0.0, strength_clip=1.0))
    base = pixels(tmp_path, "base")
    assert not np.array_equal(both, unet_only) and not np.array_equal(clip_only, base)


def test_a_strength_comparison_is_one_seed_across_strengths_and_a_grid(tmp_path, two_loras):
    a, _ = two_loras
    request = GenerationRequest(
        model_name="builtin:tiny-sd15",
        prompt="xyz_shape a red circle",
        steps=2,
        loras=[LoraUse(path=str(a))],
        strengths=[0.0, 0.5, 1.0],
    )
    written = generate(request, tmp_path / "compare")
    assert [p.name for p in written] == ["image_00.png", "image_01.png", "image_02.png", "grid.png"]
    at_zero = np.asarray(Image.open(written[0]), dtype=np.int16)
    assert np.array_equal(at_zero, pixels(tmp_path, "base"))  # strength 0 is the base model
    assert not np.array_equal(at_zero, np.asarray(Image.open(written[2]), dtype=np.int16))
    with Image.open(written[3]) as grid:
        assert grid.size == (3 * 64, 64 + 20)
    rows = [json.loads(line) for line in (tmp_path / "compare" / "samples" / "index.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows[:3]] == [f"xyz_shape a red circle (strength {s})" for s in ("0", "0.5", "1")]


def test_the_background_job_writes_samples_and_a_status(tmp_path, two_loras):
    a, _ = two_loras
    run = tmp_path / "run"
    run.mkdir()
    request = GenerationRequest(
        model_name="builtin:tiny-sd15", prompt="p", steps=2, count=2, loras=[LoraUse(path=str(a))]
    )
    (run / "request.json").write_text(request.model_dump_json())
    assert run_generation_job(run, threading.Event()) == "completed"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == status["total_steps"] == 2
    assert status["latest_samples"] == ["image_00.png", "image_01.png"]
    assert "image 2/2 done" in (run / "train.log").read_text()

    broken = tmp_path / "broken"
    broken.mkdir()
    bad = request.model_copy(update={"loras": [LoraUse(path=str(tmp_path / "missing.safetensors"))]})
    (broken / "request.json").write_text(bad.model_dump_json())
    assert run_generation_job(broken, threading.Event()) == "failed"
    assert json.loads((broken / "status.json").read_text())["error"]
