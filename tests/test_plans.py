"""recommend-training-plan: the guide's numbers (training/plans.py) and the service over a real dataset
on disk (server/plans.py). The guide's tables are copied here by hand, so a change to the rules that
drifts from the guide fails a test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from server.configs import ConfigService
from server.errors import ServiceError
from server.plans import recommend_training_plan
from training.config import LoraType, TrainingConfig
from training.data.dataset import scan_dataset
from training.data.synthetic import make_shape_dataset
from training.plans import (
    GOALS,
    TrainingPlan,
    dataset_advice,
    derived_trigger_word,
    file_size_mb,
    recommend_plan,
    trigger_word_for,
)

LORA_TYPES = get_args(LoraType)

# --- the guide, by hand ------------------------------------------------------------------------

# Rank Selection: 4-8 simple, 16-32 standard character/style, 64-96 complex; the scenarios' examples.
RANK_BAND = {
    "style": (16, 32),
    "character": (16, 32),
    "person": (16, 32),
    "object": (16, 32),
    "concept": (16, 32),
    "complex_style": (64, 96),
    "pose": (4, 8),
    "details": (4, 8),
}
SCENARIO_RANK = {"style": 16, "character": 32, "person": 24, "object": 24}
FILE_SIZE_MB = {4: 10, 8: 10, 16: 50, 24: 50, 32: 50, 64: 150, 96: 150, 128: 300}
# Optimal Strength Settings (model, CLIP); the kinds without a row use the nearest one.
STRENGTHS = {
    "style": ((0.6, 1.0), (0.6, 1.0)),
    "character": ((0.7, 0.9), (0.7, 0.9)),
    "pose": ((0.4, 0.7), (0.3, 0.6)),
    "details": ((0.3, 0.6), (0.3, 0.6)),
}
NEAREST_ROW = {"person": "character", "object": "character", "concept": "character", "complex_style": "style"}
# Optimization Techniques (quality's "steps": 5000 is deliberately not taken over).
PRESETS = {
    "balanced": {},
    "memory": {
        "low_vram": True,
        "gradient_checkpointing": True,
        "batch_size": 1,
        "gradient_accumulation_steps": 4,
        "mixed_precision": "fp16",
        "optimizer": "adafactor",
    },
    "speed": {
        "disable_sampling": True,
        "save_every": 500,
        "optimizer": "lion",
        "lr_scheduler": "constant",
        "cache_latents": True,
    },
    "quality": {
        "rank": 64,
        "alpha": 32,
        "learning_rate": 1e-4,
        "lr_scheduler": "cosine_with_restarts",
        "sample_every": 100,
        "save_every": 250,
        "prior_preservation": True,
    },
}
WITH_CLASS = {"person", "character", "object"}  # kinds with a class for prior preservation to keep


def plan_for(images: int, lora_type: str, goal: str = "balanced", **overrides) -> TrainingPlan:
    arguments = dict(
        images=images,
        lora_type=lora_type,
        goal=goal,
        model_name="stable-diffusion-v1-5/stable-diffusion-v1-5",
        native_resolution=512,
        dataset_path="my-set",
        name="my-set-plan",
        trigger_word="xyz_set",
    )
    arguments.update(overrides)
    return recommend_plan(**arguments)


# --- the guide's numbers -------------------------------------------------------------------------


@pytest.mark.parametrize("images", [24, 1])
@pytest.mark.parametrize("lora_type", LORA_TYPES)
def test_the_recommended_plan_for_n_images_of_each_lora_type_matches_the_guide(lora_type, images):
    plan = plan_for(images, lora_type)
    config = plan.config

    assert config["steps"] == (100 * images if images > 1 else 300)  # a single image: 100-500, the middle
    assert config["learning_rate"] == 2e-4
    low, high = RANK_BAND[lora_type]
    assert low <= config["rank"] <= high
    assert config["rank"] == SCENARIO_RANK.get(lora_type, config["rank"])
    assert config["alpha"] == config["rank"]
    assert plan.expected_file_size_mb == FILE_SIZE_MB[config["rank"]]
    model, clip = STRENGTHS[NEAREST_ROW.get(lora_type, lora_type)]
    assert (plan.strengths.model, plan.strengths.clip) == (model, clip)
    if lora_type in NEAREST_ROW:
        assert "nearest" in plan.strengths.note
    assert plan.estimated_minutes == (15 * config["steps"] / 1000, 30 * config["steps"] / 1000)  # SD 1.5's row
    assert {k: o.value for k, o in plan.learning_rate_options.items()} == {
        "default": 2e-4,
        "conservative": 1e-4,
        "aggressive": 3e-4,
        "fine_tuning": 5e-5,
    }
    assert config["lora_type"] == lora_type and config["trigger_word"] == "xyz_set"
    assert set(config) <= set(plan.reasons), "every chosen option says why"
    assert "create-training-config" in plan.next_step and "validate-training-config" in plan.next_step
    assert plan.warnings == []

    resolved = TrainingConfig.from_dict(config).resolve(native_resolution=512, num_images=images)
    assert resolved.steps == config["steps"] and resolved.alpha == config["rank"]


def test_the_reasons_quote_the_guide():
    plan = plan_for(24, "style")
    assert plan.reasons["steps"].startswith("100 x 24 images = 2400")
    assert "Optimal Steps = 100 x number_of_images" in plan.reasons["steps"]
    assert "Default: 2e-4" in plan.reasons["learning_rate"]
    assert "watercolor-style" in plan.reasons["rank"]
    assert "approximate" in plan.reasons["expected_file_size_mb"]
    assert "Training Time (1k steps)" in plan.reasons["estimated_minutes"]
    assert "Single image -> 100-500 steps" in plan_for(1, "style").reasons["steps"]


@pytest.mark.parametrize("lora_type", LORA_TYPES)
@pytest.mark.parametrize("goal", GOALS)
def test_each_goal_applies_exactly_the_guides_preset(goal, lora_type):
    balanced = plan_for(24, lora_type).config
    plan = plan_for(24, lora_type, goal)

    preset = dict(PRESETS[goal])
    if goal == "quality" and lora_type not in WITH_CLASS:
        del preset["prior_preservation"]
        assert "left off" in plan.reasons["prior_preservation"]
    extra = {"class_prompt"} if preset.get("prior_preservation") else set()
    assert set(plan.config) == set(balanced) | set(preset) | extra
    assert {k: plan.config[k] for k in preset} == preset
    untouched = {k: v for k, v in balanced.items() if k not in preset}
    assert {k: v for k, v in plan.config.items() if k not in preset and k not in extra} == untouched
    if extra:
        assert plan.config["class_prompt"]
    assert plan.config["steps"] == 2400  # quality too: the guide's 5000 is its rule at 50 images
    assert set(PRESETS[goal]) <= set(plan.reasons)
    TrainingConfig.from_dict(plan.config)


def test_quality_for_a_person_preserves_the_class_with_a_class_prompt():
    plan = plan_for(24, "person", "quality")
    config = TrainingConfig.from_dict(plan.config)
    assert config.prior_preservation and config.class_prompt == "a photo of a person"
    assert "without the quality goal it would be 24" in plan.reasons["rank"]
    assert plan.expected_file_size_mb == 150


def test_speed_says_lion_needs_its_package():
    assert "lion-pytorch" in plan_for(24, "style", "speed").reasons["optimizer"]


def test_memory_time_counts_the_four_micro_batches_per_step():
    plan = plan_for(10, "style", "memory")
    assert plan.estimated_minutes == (60.0, 120.0)  # 1k steps x SD 1.5's 15-30 min x 4 images per step


@pytest.mark.parametrize(
    ("model_name", "native", "per_1k_steps"),
    [
        ("builtin:tiny-sd15", 64, (15, 30)),
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", 512, (15, 30)),
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", None, (15, 30)),
        ("stabilityai/stable-diffusion-2-1", 768, (21, 42)),  # between SD 1.5 and SDXL
        ("stabilityai/stable-diffusion-2-1", None, (21, 42)),
        ("stabilityai/stable-diffusion-xl-base-1.0", 1024, (30, 60)),
        ("model.safetensors", 1024, (30, 60)),
        ("black-forest-labs/FLUX.1-dev", None, (60, 120)),
        ("ostris/Flex.1-alpha", 1024, (60, 120)),
    ],
)
def test_training_time_uses_the_guides_hardware_row(model_name, native, per_1k_steps):
    plan = plan_for(10, "style", model_name=model_name, native_resolution=native)
    assert plan.estimated_minutes == per_1k_steps
    assert plan.warnings == []  # every family trains
    if native == 64:
        assert "SD 1.5-class" in plan.reasons["model_name"]


@pytest.mark.parametrize(
    ("model_name", "native", "optimizer", "precision", "quantize"),
    [
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", 512, "adamw", "fp16", None),
        ("stabilityai/stable-diffusion-xl-base-1.0", 1024, "adamw", "bf16", None),
        ("ostris/Flex.1-alpha", 1024, "adafactor", "bf16", "8bit"),
        ("builtin:tiny-flux", 64, "adafactor", "bf16", None),  # a toy transformer needs no 8-bit weights
    ],
)
def test_the_model_family_sets_optimizer_precision_and_8bit_weights(model_name, native, optimizer, precision, quantize):
    plan = plan_for(10, "style", model_name=model_name, native_resolution=native)
    config = plan.config
    assert (config["optimizer"], config["mixed_precision"], config.get("quantize_base")) == (
        optimizer,
        precision,
        quantize,
    )
    assert plan.reasons["optimizer"] and plan.reasons["mixed_precision"]
    family = "flux" if "flux" in model_name.lower() or "flex" in model_name.lower() else "sd1"
    assert TrainingConfig.from_dict(config).family_conflicts(family) == ([], [])


@pytest.mark.parametrize(("rank", "size"), sorted(FILE_SIZE_MB.items()))
def test_file_size_is_the_guides_rank_table(rank, size):
    assert file_size_mb(rank)[0] == size


def test_dataset_advice_compares_with_the_guides_range():
    assert dataset_advice(5, "style").startswith("too few") and "10-50" in dataset_advice(5, "style")
    assert dataset_advice(24, "style").startswith("good")
    assert dataset_advice(300, "complex_style").startswith("more than needed")


def test_a_plan_needs_an_image():
    with pytest.raises(ValueError, match="at least one"):
        plan_for(0, "style")


# --- trigger words ---------------------------------------------------------------------------------


def test_the_trigger_word_every_caption_starts_with_is_kept(tmp_path):
    make_shape_dataset(tmp_path / "set", 3, trigger_word="xyz_shape")
    choice = trigger_word_for("set", scan_dataset(tmp_path / "set", trigger_word=None, trigger_words={}))
    assert choice.word == "xyz_shape" and "every caption" in choice.reason


def test_without_a_trigger_in_the_captions_one_is_made_from_the_name(tmp_path):
    make_shape_dataset(tmp_path / "set", 3)  # captions start with 'a', which is no trigger word
    choice = trigger_word_for("My-Shapes.2", scan_dataset(tmp_path / "set", trigger_word=None, trigger_words={}))
    assert choice.word == "xyz_my_shapes_2"
    assert derived_trigger_word("xyz_cat") == "xyz_cat"


def test_a_caption_that_starts_oddly_is_no_trigger_word(tmp_path):
    make_shape_dataset(tmp_path / "set", 2, trigger_word="xyz_shape")
    (tmp_path / "set" / "shape_000.txt").write_text(", xyz_shape a red circle")
    choice = trigger_word_for("set", scan_dataset(tmp_path / "set", trigger_word=None, trigger_words={}))
    assert choice.word == "xyz_set"


def test_one_concept_folder_names_the_trigger_and_several_keep_their_own(tmp_path):
    make_shape_dataset(tmp_path / "one" / "10_xyz_cat", 2)
    one = trigger_word_for("one", scan_dataset(tmp_path / "one", trigger_word=None, trigger_words={}))
    assert one.word == "xyz_cat"

    make_shape_dataset(tmp_path / "two" / "xyz_cat", 2)
    make_shape_dataset(tmp_path / "two" / "xyz_dog", 2, seed=1)
    two = trigger_word_for("two", scan_dataset(tmp_path / "two", trigger_word=None, trigger_words={}))
    assert two.word is None and "xyz_cat" in two.reason and "xyz_dog" in two.reason
    plan = plan_for(4, "concept", trigger_word=None, trigger_reason=two.reason)
    assert "trigger_word" not in plan.config and plan.reasons["trigger_word"] == two.reason


# --- the service over a dataset on disk --------------------------------------------------------------


def make_dataset(workspace: Path, name: str, count: int, **options) -> Path:
    folder = workspace / "datasets" / name
    make_shape_dataset(folder, count, **options)
    return folder


def test_the_service_plans_a_real_dataset_that_validates(workspace, tiny_sd15, tmp_path):
    make_dataset(workspace, "plan-shapes", 6, trigger_word="xyz_shape")

    plan = recommend_training_plan(
        workspace, dataset_name="plan-shapes", lora_type="style", model_name="builtin:tiny-sd15", goal="balanced"
    )

    assert plan.images == 6
    assert plan.config == {
        "name": "plan-shapes-style",
        "model_name": "builtin:tiny-sd15",
        "dataset_path": "plan-shapes",
        "trigger_word": "xyz_shape",
        "lora_type": "style",
        "steps": 600,
        "learning_rate": 2e-4,
        "rank": 16,
        "alpha": 16,
        "mixed_precision": "fp16",
        "optimizer": "adamw",
    }
    assert "64 px" in plan.reasons["model_name"] and "SD 1.5-class" in plan.reasons["model_name"]
    assert plan.estimated_minutes == (9.0, 18.0)
    assert plan.dataset_advice.startswith("too few: 6 image(s)")

    # What the plan says to do next works: create the config, and it validates against the same dataset.
    configs = ConfigService(tmp_path)
    configs.create(plan.config)
    report = configs.validate("plan-shapes-style")
    assert report.valid, report.errors
    assert (report.images, report.native_resolution) == (6, 64)


def test_the_service_plans_by_the_family_the_models_files_say(workspace, tmp_path):
    import shutil

    from training.models.builtin import ensure_builtin

    make_dataset(workspace, "plan-shapes", 6, trigger_word="xyz_shape")
    renamed = tmp_path / "my-model"  # its name says nothing of FLUX; its files do
    shutil.copytree(ensure_builtin("builtin:tiny-flux", workspace / "models"), renamed)
    plan = recommend_training_plan(
        workspace, dataset_name="plan-shapes", lora_type="style", model_name=str(renamed), goal="balanced"
    )
    assert (plan.config["optimizer"], plan.config["mixed_precision"]) == ("adafactor", "bf16")
    assert "FLUX-class" in plan.reasons["model_name"]
    assert plan.estimated_minutes == (36.0, 72.0)  # the guide's FLUX row: 60-120 min per 1k steps x 600 steps


def test_the_config_name_skips_names_already_taken(tmp_path):
    make_dataset(tmp_path, "shapes", 2)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "shapes-pose.yaml").write_text("name: shapes-pose\n")
    plan = recommend_training_plan(tmp_path, dataset_name="shapes", lora_type="pose", model_name=None, goal="speed")
    assert plan.config["name"] == "shapes-pose-2"


def test_without_model_name_the_plan_is_for_the_default_model(tmp_path):
    make_dataset(tmp_path, "shapes", 2)
    plan = recommend_training_plan(tmp_path, dataset_name="shapes", lora_type="person", goal="quality")
    assert plan.config["model_name"] == TrainingConfig.model_fields["model_name"].default
    assert "not read" in plan.reasons["model_name"]
    assert plan.config["trigger_word"] == "xyz_shapes"  # the captions have none
    assert plan.config["class_prompt"] == "a photo of a person"
    TrainingConfig.from_dict(plan.config)


def test_a_missing_optional_optimizer_is_a_warning(tmp_path, monkeypatch):
    import server.plans

    monkeypatch.setattr(server.plans, "_OPTIONAL_OPTIMIZERS", {"lion": ("no_such_module_here", "lion-pytorch")})
    make_dataset(tmp_path, "shapes", 2)
    plan = recommend_training_plan(tmp_path, dataset_name="shapes", lora_type="style", goal="speed")
    assert any("pip install lion-pytorch" in w for w in plan.warnings)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(dataset_name="no-such-set"), "no dataset 'no-such-set'"),
        (dict(dataset_name="../x"), "not allowed"),
        (dict(dataset_name="empty"), "no training images"),
        (dict(dataset_name="shapes", goal="fastest"), "goal 'fastest' is not known"),
        (dict(dataset_name="shapes", lora_type="landscape"), "lora_type 'landscape' is not known"),
        (dict(dataset_name="shapes", model_name="builtin:nope"), "leave model_name out"),
    ],
)
def test_bad_requests_are_service_errors_that_say_what_to_do(tmp_path, arguments, message):
    make_dataset(tmp_path, "shapes", 1)
    (tmp_path / "datasets" / "empty").mkdir()
    (tmp_path / "datasets" / "empty" / "notes.txt").write_text("no images yet")
    with pytest.raises(ServiceError, match=message):
        recommend_training_plan(tmp_path, **{"lora_type": "style", "model_name": None, **arguments})


def test_the_service_module_imports_no_torch():
    code = (
        "import sys, server.plans; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


@pytest.mark.parametrize(
    ("model_name", "native", "precision"),
    [("stable-diffusion-v1-5/stable-diffusion-v1-5", 512, "fp16"), ("stabilityai/stable-diffusion-xl-base-1.0", 1024, "bf16")],
)
def test_the_precision_follows_the_model_family(model_name, native, precision):
    plan = plan_for(24, "style", model_name=model_name, native_resolution=native)
    assert plan.config["mixed_precision"] == precision and precision in plan.reasons["mixed_precision"]
    assert (
        plan_for(24, "style", "memory", model_name=model_name, native_resolution=native).config["mixed_precision"]
        == "fp16"
    )  # the guide's memory preset


def test_the_memory_preset_keeps_bf16_where_fp16_overflows():
    sd = plan_for(10, "style", goal="memory", model_name="stable-diffusion-v1-5/stable-diffusion-v1-5", native_resolution=512)
    flux = plan_for(10, "style", goal="memory", model_name="ostris/Flex.1-alpha", native_resolution=1024)
    assert sd.config["mixed_precision"] == "fp16"  # the guide's Memory Optimization
    assert flux.config["mixed_precision"] == "bf16" and "saves no more" in flux.reasons["mixed_precision"]
    assert flux.config["optimizer"] == "adafactor" and flux.config["quantize_base"] == "8bit"
