"""Pre-flight diagnostic rules, each on its own."""

from __future__ import annotations

import pytest

from training.config import TrainingConfig
from training.data.report import ConceptCount, DatasetReport
from training.diagnostics.evidence import RunEvidence
from training.estimates import estimate_minutes, estimate_vram_gb, model_family
from training.families import FLUX, SD2, SDXL
from training.families import SD1 as SD15
from training.diagnostics.preflight import (
    PREFLIGHT_RULES,
    alpha_above_rank,
    captions_missing_trigger,
    generic_trigger_word,
    learning_rate_band,
    preflight_findings,
    rank_for_dataset,
    resolution_below_native,
    steps_vs_images,
    too_few_images,
    training_time_estimate,
    vram_estimate,
)


def config(**values) -> TrainingConfig:
    return TrainingConfig.from_dict({"name": "c", "dataset_path": "d", **values})


def evidence(cfg: TrainingConfig, images: int | None = None, **known) -> RunEvidence:
    return RunEvidence(config=cfg, images=images, **known)


def assert_patch_validates(cfg: TrainingConfig, patch: dict) -> TrainingConfig:
    return TrainingConfig.from_dict({**cfg.model_dump(exclude_none=True), **patch})


def report(
    images: int = 20, concepts: tuple[tuple[str, str | None], ...] = (("", "xyz_cat"),), **lists
) -> DatasetReport:
    """A DatasetReport built by hand: `images` clean images unless `lists` says otherwise."""
    return DatasetReport(
        dataset="d",
        images=images,
        validation_images=0,
        samples_per_epoch=images,
        concepts=[
            ConceptCount(folder=folder, trigger_word=trigger, repeats=1, images=images, samples_per_epoch=images)
            for folder, trigger in concepts
        ],
        resolution_min=[512, 512],
        resolution_median=[512, 512],
        resolution_max=[512, 512],
        buckets={"512x512": images},
        formats={"png": images},
        total_size_bytes=images * 1000,
        uncaptioned=lists.get("uncaptioned", []),
        orphan_captions=[],
        missing_trigger=lists.get("missing_trigger", []),
        near_duplicates=[],
        below_native_resolution=[],
        blurry=[],
        badly_exposed=[],
        similar_captions=[],
        lora_type="style",
        verdict="good",
        problems=[],
    )


# --- the guide's advice on steps, learning rate, alpha and trigger words ------------------------------------
def test_steps_far_from_100_per_image():
    assert steps_vs_images(evidence(config(steps=2000), 20)) is None
    finding = steps_vs_images(evidence(config(steps=100), 20))
    assert finding.rule == "steps-vs-images" and finding.patch == {"steps": 2000}
    assert "underfitting" in finding.message
    assert "overfitting" in steps_vs_images(evidence(config(steps=20000), 20)).message
    assert steps_vs_images(evidence(config(), 20)) is None  # steps unset: the default is 100 x images
    # Without a count, the dataset report's is used.
    assert steps_vs_images(evidence(config(steps=100), dataset=report(20))).evidence["images"] == 20


def test_learning_rate_bands():
    assert learning_rate_band(evidence(config())) is None
    high = learning_rate_band(evidence(config(learning_rate=1e-2)))
    assert high.patch == {"learning_rate": 2e-4} and "oscillate" in high.message
    assert "barely move" in learning_rate_band(evidence(config(learning_rate=1e-6))).message
    prodigy = learning_rate_band(evidence(config(optimizer="prodigy")))
    assert prodigy.patch == {"learning_rate": 1.0}
    assert learning_rate_band(evidence(config(optimizer="prodigy", learning_rate=1.0))) is None


def test_alpha_above_rank():
    assert alpha_above_rank(evidence(config(rank=16, alpha=16))) is None
    assert alpha_above_rank(evidence(config(rank=64, alpha=32))) is None
    finding = alpha_above_rank(evidence(config(rank=16, alpha=32)))
    assert finding.evidence == {"rank": 16, "alpha": 32.0} and finding.patch == {"alpha": 16.0}


def test_generic_trigger_words():
    assert generic_trigger_word(evidence(config(trigger_word="xyz_style"))) is None
    finding = generic_trigger_word(evidence(config(trigger_word="style")))
    assert finding.patch == {"trigger_word": "xyz_style"}
    assert generic_trigger_word(evidence(config(trigger_words={"dogs": "dog"}))).patch == {}


# --- rank and dataset ------------------------------------------------------------------------------------
def test_rank_for_dataset_leaves_fitting_ranks_alone():
    assert rank_for_dataset(evidence(config(rank=32), 10)) is None
    assert rank_for_dataset(evidence(config(rank=64), 30)) is None
    assert rank_for_dataset(evidence(config(rank=128), 50)) is None
    assert rank_for_dataset(evidence(config(rank=128))) is None  # image count unknown


def test_rank_for_dataset_suggests_the_standard_rank():
    cfg = config(rank=64)
    finding = rank_for_dataset(evidence(cfg, 20))
    assert finding.rule == "rank-for-dataset" and finding.severity == "warning"
    assert finding.evidence == {
        "rank": 64,
        "images": 20,
        "images_for_rank": 30,
        "file_mb": 150,
        "suggested_file_mb": 50,
    }
    assert finding.patch == {"rank": 32}
    assert assert_patch_validates(cfg, finding.patch).effective_rank == 32

    cfg = config(rank=128, alpha=64)  # alpha above 32 follows the rank down
    finding = rank_for_dataset(evidence(cfg, 40))
    assert finding.evidence["images_for_rank"] == 50 and finding.evidence["file_mb"] == 300
    assert finding.patch == {"rank": 32, "alpha": 32.0}
    assert assert_patch_validates(cfg, finding.patch).effective_alpha == 32.0

    assert rank_for_dataset(evidence(config(rank=128, alpha=16), 40)).patch == {"rank": 32}

    cfg = config(network_dim=96, network_alpha=96)  # the kohya names win, so the patch uses them
    finding = rank_for_dataset(evidence(cfg, 10))
    assert finding.patch == {"network_dim": 32, "network_alpha": 32.0}
    patched = assert_patch_validates(cfg, finding.patch)
    assert (patched.effective_rank, patched.effective_alpha) == (32, 32.0)


def test_captions_missing_trigger_needs_a_report_with_gaps():
    assert captions_missing_trigger(evidence(config(), 20)) is None
    assert captions_missing_trigger(evidence(config(), dataset=report())) is None


def test_captions_missing_trigger_lists_the_files():
    missing = [f"img{i:02}.png" for i in range(12)]
    finding = captions_missing_trigger(evidence(config(), dataset=report(missing_trigger=missing)))
    assert finding.rule == "captions-missing-trigger" and finding.severity == "info"  # a run puts it first
    assert finding.evidence == {
        "missing_trigger": 12,
        "uncaptioned": 0,
        "trigger_words": ["xyz_cat"],
        "files": missing[:10],
    }
    assert "update-captions with trigger_word='xyz_cat'" in finding.message and finding.patch == {}

    finding = captions_missing_trigger(evidence(config(), dataset=report(uncaptioned=["a.png", "b.png"])))
    assert finding.severity == "warning" and finding.evidence["uncaptioned"] == 2
    assert finding.evidence["files"] == ["a.png", "b.png"] and "generate-captions" in finding.message

    two_concepts = report(concepts=(("1_xyz_cat", "xyz_cat"), ("1_xyz_dog", "xyz_dog")), missing_trigger=["x.png"])
    finding = captions_missing_trigger(evidence(config(), dataset=two_concepts))
    assert "edits" in finding.message and "trigger_word=" not in finding.message


def test_too_few_images_against_the_guide_range():
    assert too_few_images(evidence(config(), 3)) is None  # lora_type unset
    assert too_few_images(evidence(config(lora_type="character"))) is None  # count unknown
    assert too_few_images(evidence(config(lora_type="character"), 20)) is None
    assert too_few_images(evidence(config(lora_type="character"), 100)) is None

    below = too_few_images(evidence(config(lora_type="character"), 12))
    assert below.rule == "too-few-images" and below.severity == "warning" and below.patch == {}
    assert below.evidence == {"images": 12, "lora_type": "character", "guide_range": [20, 100]}

    above = too_few_images(evidence(config(lora_type="complex_style"), 201))
    assert above.severity == "info" and above.evidence["guide_range"] == [50, 200]


# --- the model: memory, resolution, time -------------------------------------------------------------------
def test_model_family_from_name_and_native_size():
    assert model_family(config(), 512) is SD15
    assert model_family(config(), 64) is SD15  # a tiny test model
    assert model_family(config(), 768) is SD2
    assert model_family(config(), 1024) is SDXL
    assert model_family(config(model_name="black-forest-labs/FLUX.1-dev"), 1024) is FLUX
    assert model_family(config(model_name="ostris/Flex.1-alpha"), None) is FLUX
    assert model_family(config(model_name="sdxl.safetensors"), None) is SDXL
    assert model_family(config(model_name="model.safetensors"), None) is SD15


def test_vram_estimate_reproduces_the_guide_table():
    # The anchor (batch 1, native size, fp16, AdamW, rank 32) is the guide's recommended VRAM ...
    assert estimate_vram_gb(config(mixed_precision="fp16"), 512) == pytest.approx(8.0)
    assert estimate_vram_gb(config(mixed_precision="bf16"), 1024) == pytest.approx(16.0)
    flux = config(model_name="flux-dev", mixed_precision="bf16", quantize_base="8bit")
    assert estimate_vram_gb(flux, 1024) == pytest.approx(24.0)  # the guide's FLUX row: 8-bit weights
    assert estimate_vram_gb(config(model_name="flux-dev", mixed_precision="bf16"), 1024) == pytest.approx(35.9)
    # ... and the guide's memory preset brings it to about the minimum.
    preset = dict(mixed_precision="fp16", gradient_checkpointing=True, low_vram=True, optimizer="adafactor")
    assert estimate_vram_gb(config(**preset), 512) == pytest.approx(6.0, abs=0.1)
    assert estimate_vram_gb(config(**preset), 1024) == pytest.approx(12.0, abs=0.3)


def test_vram_estimate_factors():
    anchor = dict(mixed_precision="fp16")
    base = estimate_vram_gb(config(**anchor), 1024)
    weights, lora = 5.1 + 1.8, 32 * 1.2e6 * 16 / 1e9
    activations = base - weights - lora
    assert estimate_vram_gb(config(**anchor, batch_size=2), 1024) == pytest.approx(base + activations)
    assert estimate_vram_gb(config(**anchor, resolution=512), 1024) == pytest.approx(base - 0.75 * activations)
    assert estimate_vram_gb(config(**anchor, gradient_checkpointing=True), 1024) == pytest.approx(
        base - 0.25 * activations
    )
    assert estimate_vram_gb(config(**anchor, low_vram=True), 1024) == pytest.approx(base - 1.8)
    assert estimate_vram_gb(config(**anchor, optimizer="adafactor"), 1024) == pytest.approx(base - lora / 2)
    assert estimate_vram_gb(config(**anchor, rank=128), 1024) == pytest.approx(base + 3 * lora)
    # No mixed precision: fp32 weights (2x) and ~1.5x the activations.
    assert estimate_vram_gb(config(), 1024) == pytest.approx(2 * weights + lora + 1.5 * activations)


def test_vram_estimate_without_a_device_is_information():
    finding = vram_estimate(evidence(config(mixed_precision="fp16"), native_resolution=1024))
    assert finding.rule == "vram-estimate" and finding.severity == "info" and finding.patch == {}
    assert finding.evidence["estimate_gb"] == 16.0 and finding.evidence["family"] == "SDXL"
    assert (finding.evidence["guide_minimum_gb"], finding.evidence["guide_recommended_gb"]) == (12, 16)
    assert vram_estimate(evidence(config(), native_resolution=64)) is None  # tiny test model: no guide row


def test_vram_estimate_fits_the_device():
    assert vram_estimate(evidence(config(mixed_precision="fp16"), native_resolution=1024, device_memory_gb=24)) is None


def test_vram_estimate_over_the_device_suggests_the_memory_preset():
    cfg = config(batch_size=4, gradient_accumulation_steps=2)
    finding = vram_estimate(evidence(cfg, native_resolution=1024, device_memory_gb=12))
    assert finding.severity == "warning" and finding.evidence["device_memory_gb"] == 12
    assert finding.evidence["estimate_gb"] > 12 >= finding.evidence["with_memory_preset_gb"]
    assert finding.patch == {
        "low_vram": True,
        "gradient_checkpointing": True,
        "batch_size": 1,
        "gradient_accumulation_steps": 8,  # the effective batch stays 8
        "mixed_precision": "fp16",
        "optimizer": "adafactor",
    }
    patched = assert_patch_validates(cfg, finding.patch)
    assert patched.effective_batch_size == cfg.effective_batch_size
    assert estimate_vram_gb(patched, 1024) <= 12

    cfg = config(optimizer="prodigy", learning_rate=1.0, mixed_precision="bf16")
    finding = vram_estimate(evidence(cfg, native_resolution=512, device_memory_gb=6))
    assert finding.patch == {
        "low_vram": True,
        "gradient_checkpointing": True,
        "optimizer": "adafactor",
        "learning_rate": 2e-4,
    }
    assert_patch_validates(cfg, finding.patch)


def test_vram_estimate_beyond_the_memory_preset_says_so():
    cfg = config(
        model_name="flux-dev",
        mixed_precision="bf16",
        gradient_checkpointing=True,
        low_vram=True,
        optimizer="adafactor",
        quantize_base="8bit",
    )
    finding = vram_estimate(evidence(cfg, native_resolution=1024, device_memory_gb=8))
    assert finding.patch == {} and "lower the resolution" in finding.message


def test_vram_estimate_for_flux_offers_an_8bit_transformer():
    cfg = config(model_name="flux-dev", mixed_precision="bf16")
    finding = vram_estimate(evidence(cfg, native_resolution=1024, device_memory_gb=24))
    assert finding.severity == "warning" and finding.patch["quantize_base"] == "8bit"
    assert finding.evidence["with_memory_preset_gb"] < 24 < finding.evidence["estimate_gb"]
    assert_patch_validates(cfg, finding.patch)


def test_resolution_below_native():
    assert resolution_below_native(evidence(config(), native_resolution=1024)) is None
    assert resolution_below_native(evidence(config(resolution=1024), native_resolution=1024)) is None
    assert resolution_below_native(evidence(config(resolution=768))) is None  # native unknown
    finding = resolution_below_native(evidence(config(resolution=768), native_resolution=1024))
    assert finding.rule == "resolution-below-native" and finding.severity == "info" and finding.patch == {}
    assert finding.evidence == {"resolution": 768, "native_resolution": 1024, "pixel_ratio": 0.562}


def test_estimate_minutes():
    assert estimate_minutes(config(), 1024, None) is None  # no steps and no images
    assert estimate_minutes(config(), 1024, 20) == (60.0, 120.0)  # 2000 steps x SDXL's 30-60 per 1k
    assert estimate_minutes(config(steps=1000), 512, None) == (15.0, 30.0)
    # 2 images per step at a quarter of the pixels: half the work per step.
    assert estimate_minutes(config(steps=1000, batch_size=2, resolution=512), 1024, None) == (15.0, 30.0)
    assert estimate_minutes(config(model_name="flux-dev", steps=500), 1024, None) == (30.0, 60.0)


def test_training_time_estimate():
    assert training_time_estimate(evidence(config())) is None
    assert training_time_estimate(evidence(config(), 4, native_resolution=64)) is None  # tiny test model
    finding = training_time_estimate(evidence(config(), 20, native_resolution=1024))
    assert finding.rule == "time-estimate" and finding.severity == "info" and finding.patch == {}
    assert finding.evidence["steps"] == 2000 and finding.evidence["minutes"] == [60.0, 120.0]
    assert finding.evidence["guide_minutes_per_1k"] == [30, 60]


# --- all together -------------------------------------------------------------------------------------------
def test_preflight_collects_every_rule():
    cfg = config(
        steps=10, learning_rate=1e-2, rank=64, alpha=128, trigger_word="person", lora_type="character", resolution=768
    )
    dataset = report(10, missing_trigger=["a.png"])
    findings = preflight_findings(evidence(cfg, 10, dataset=dataset, native_resolution=1024))
    assert [f.rule for f in findings] == [
        "steps-vs-images",
        "learning-rate",
        "alpha-above-rank",
        "generic-trigger-word",
        "rank-for-dataset",
        "captions-missing-trigger",
        "too-few-images",
        "vram-estimate",
        "resolution-below-native",
        "time-estimate",
    ]
    assert len(findings) == len(PREFLIGHT_RULES)
    assert all(f.line().startswith(f"[{f.rule}]") for f in findings)
    for finding in findings:
        assert_patch_validates(cfg, finding.patch)


def test_the_family_read_from_the_files_or_set_in_the_config_wins_over_guesses():
    from training.estimates import model_family
    from training.families import SD2, SDXL

    plain = config(model_name="my-model")  # a name that says nothing, no size known
    assert model_family(plain, None).name == "SD 1.5"  # the guess
    assert model_family(plain, None, "sdxl") is SDXL  # the files say SDXL
    assert model_family(config(model_name="my-model", model_family="sd2"), 1024, "sdxl") is SD2  # the override
    finding = vram_estimate(evidence(config(mixed_precision="fp16"), native_resolution=None, model_family="sdxl"))
    assert finding.evidence["family"] == "SDXL" and finding.evidence["estimate_gb"] == 16.0
