"""Pre-flight rules: the guide's advice checked against a config (and what is known of its dataset and
model) before training starts. Each rule takes the run's `RunEvidence` and returns a `Finding` or None."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from training.diagnostics.findings import Finding
from training.estimates import (
    estimate_minutes,
    estimate_vram_gb,
    memory_preset_patch,
    model_family,
    pixel_ratio,
    tiny_model,
)
from training.guide import (
    DEFAULT_LEARNING_RATE,
    GENERIC_TRIGGERS,
    GUIDE_IMAGE_RANGE,
    GUIDE_LR_RANGE,
    PRODIGY_LR,
    RANK_NEEDS_IMAGES,
    STANDARD_RANK,
    STEPS_PER_IMAGE,
    guide_file_mb,
)

if TYPE_CHECKING:
    from training.diagnostics.evidence import RunEvidence

FILES_SHOWN = 10


def _images(evidence: RunEvidence) -> int | None:
    """Training images: the count given, else the dataset report's."""
    if evidence.images is not None:
        return evidence.images
    return evidence.dataset.images if evidence.dataset is not None else None


# --- the guide's advice on steps, learning rate, alpha and trigger words --------------------------------
def steps_vs_images(evidence: RunEvidence) -> Finding | None:
    """The guide's rule of thumb: 100 steps per image; far off either way under- or overtrains."""
    config, images = evidence.config, _images(evidence)
    if config.steps is None or not images:
        return None
    suggested = STEPS_PER_IMAGE * images
    ratio = config.steps / suggested
    if 0.33 <= ratio <= 3.0:
        return None
    direction = "few" if ratio < 1 else "many"
    return Finding(
        rule="steps-vs-images",
        severity="warning",
        message=f"{config.steps} steps is {ratio:.1f}x the guide's 100 x {images} images: likely too {direction} "
        f"({'underfitting' if ratio < 1 else 'overfitting'}).",
        evidence={"steps": config.steps, "images": images, "suggested_steps": suggested},
        patch={"steps": suggested},
    )


def learning_rate_band(evidence: RunEvidence) -> Finding | None:
    config = evidence.config
    lr = config.learning_rate
    if config.optimizer == "prodigy":
        if lr == PRODIGY_LR:
            return None
        return Finding(
            rule="learning-rate",
            severity="warning",
            message=f"Prodigy sets its own step size; learning_rate should be {PRODIGY_LR:g}, not {lr:g}.",
            evidence={"optimizer": "prodigy", "learning_rate": lr},
            patch={"learning_rate": PRODIGY_LR},
        )
    low, high = GUIDE_LR_RANGE
    if low <= lr <= high * 1.5:
        return None
    return Finding(
        rule="learning-rate",
        severity="warning",
        message=f"learning_rate {lr:g} is outside the guide's range {low:g}-{high:g} for {config.optimizer}: "
        f"{'training may barely move' if lr < low else 'loss may oscillate or explode'}.",
        evidence={"learning_rate": lr, "optimizer": config.optimizer, "guide_range": [low, high]},
        patch={"learning_rate": DEFAULT_LEARNING_RATE},
    )


def alpha_above_rank(evidence: RunEvidence) -> Finding | None:
    rank, alpha = evidence.config.effective_rank, evidence.config.effective_alpha
    if alpha <= rank:
        return None
    return Finding(
        rule="alpha-above-rank",
        severity="warning",
        message=f"alpha {alpha:g} above rank {rank} scales the update by {alpha / rank:g}x: an effectively higher "
        "learning rate; the guide uses alpha equal to rank, or lower for regularisation.",
        evidence={"rank": rank, "alpha": alpha},
        patch={"alpha": float(rank)},
    )


def generic_trigger_word(evidence: RunEvidence) -> Finding | None:
    config = evidence.config
    words = [w for w in [config.trigger_word, *config.trigger_words.values()] if w]
    generic = [w for w in words if w.lower() in GENERIC_TRIGGERS]
    if not generic:
        return None
    return Finding(
        rule="generic-trigger-word",
        severity="warning",
        message=f"trigger word {generic[0]!r} is an ordinary word the model already knows: use a unique token "
        f"such as 'xyz_{generic[0].lower()}' (the guide: xyz_style, not 'style').",
        evidence={"trigger_words": generic},
        patch={"trigger_word": f"xyz_{generic[0].lower()}"} if config.trigger_word in generic else {},
    )


# --- rank and dataset ----------------------------------------------------------------------------------
def rank_for_dataset(evidence: RunEvidence) -> Finding | None:
    """A large rank on a small dataset overfits and makes a big file (thresholds: RANK_NEEDS_IMAGES)."""
    config, images = evidence.config, _images(evidence)
    rank = config.effective_rank
    if not images:
        return None
    needed = next((n for min_rank, n in RANK_NEEDS_IMAGES if rank >= min_rank), None)
    if needed is None or images >= needed:
        return None
    patch: dict = {"rank": STANDARD_RANK}
    if config.lora.alpha is not None and config.lora.alpha > STANDARD_RANK:  # an alpha left out follows the rank
        patch["alpha"] = float(STANDARD_RANK)
    return Finding(
        rule="rank-for-dataset",
        severity="warning",
        message=f"rank {rank} on {images} images tends to memorise them and makes a ~{guide_file_mb(rank)} MB file "
        f"(the guide's 64+ is for complex concepts; this rank wants {needed}+ images): use rank {STANDARD_RANK}, "
        f"the guide's standard (~{guide_file_mb(STANDARD_RANK)} MB).",
        evidence={
            "rank": rank,
            "images": images,
            "images_for_rank": needed,
            "file_mb": guide_file_mb(rank),
            "suggested_file_mb": guide_file_mb(STANDARD_RANK),
        },
        patch=config.in_given_names(patch),
    )


def captions_missing_trigger(evidence: RunEvidence) -> Finding | None:
    """The guide: "Include trigger word in all captions". Needs a dataset report. An uncaptioned image trains
    on the trigger word alone (a warning); a caption without its trigger word gets it put first when a run
    reads it, so that is only the files disagreeing with what trains (info)."""
    report = evidence.dataset
    if report is None or not (report.missing_trigger or report.uncaptioned):
        return None
    missing, uncaptioned = list(report.missing_trigger), list(report.uncaptioned)
    triggers = sorted({c.trigger_word for c in report.concepts if c.trigger_word})
    if len(triggers) == 1:
        fix = f"call update-captions with trigger_word={triggers[0]!r} to put it first in every caption"
    else:
        fix = "add each concept's trigger word to those captions with update-captions (edits)"
    if uncaptioned:
        fix = f"caption the images (generate-captions, or update-captions edits), then {fix}"
    parts = [f"{len(missing)} caption(s) lack their trigger word"] if missing else []
    parts += [f"{len(uncaptioned)} image(s) have no caption and train on the trigger word alone"] if uncaptioned else []
    return Finding(
        rule="captions-missing-trigger",
        severity="warning" if uncaptioned else "info",
        message=f"{' and '.join(parts)} (the guide: include the trigger word in all captions): {fix}.",
        evidence={
            "missing_trigger": len(missing),
            "uncaptioned": len(uncaptioned),
            "trigger_words": triggers,
            "files": (missing + uncaptioned)[:FILES_SHOWN],
        },
    )


def too_few_images(evidence: RunEvidence) -> Finding | None:
    """The image count against the guide's "Dataset Size Guidelines" for the config's lora_type."""
    config, images = evidence.config, _images(evidence)
    if config.lora_type is None or images is None:
        return None
    low, high = GUIDE_IMAGE_RANGE[config.lora_type]
    if low <= images <= high:
        return None
    facts = {"images": images, "lora_type": config.lora_type, "guide_range": [low, high]}
    if images < low:
        return Finding(
            rule="too-few-images",
            severity="warning",
            message=f"{images} images is below the guide's {low}-{high} for a {config.lora_type} LoRA: add varied "
            "images (angles, lighting, settings), or expect a LoRA that copies its few images.",
            evidence=facts,
        )
    return Finding(
        rule="too-few-images",
        severity="info",
        message=f"{images} images is more than the guide's {low}-{high} for a {config.lora_type} LoRA: curate the "
        f"best (quality over quantity); every image costs {STEPS_PER_IMAGE} more steps.",
        evidence=facts,
    )


# --- the model: memory, resolution, time ----------------------------------------------------------------
def vram_estimate(evidence: RunEvidence) -> Finding | None:
    """The estimate against the device's memory: a warning with the memory preset when it does not fit;
    with the device unknown, the estimate and the guide's row as information."""
    config = evidence.config
    if tiny_model(evidence.native_resolution):
        return None
    family = model_family(config, evidence.native_resolution, evidence.model_family)
    need = estimate_vram_gb(config, evidence.native_resolution, evidence.model_family)
    patch = memory_preset_patch(config, family)
    with_preset = estimate_vram_gb(config.model_copy(update=patch), evidence.native_resolution, evidence.model_family)
    hardware = family.hardware_of(config.model_name)
    source = "the guide's" if hardware.from_guide else f"{hardware.estimated}:"
    row = f"{family.name}: {source} minimum {hardware.minimum_gb:g} GB, recommended {hardware.recommended_gb:g} GB"
    facts = {
        "estimate_gb": round(need, 1),
        "with_memory_preset_gb": round(with_preset, 1),
        "family": family.name,
        "guide_minimum_gb": hardware.minimum_gb,
        "guide_recommended_gb": hardware.recommended_gb,
    }
    device = evidence.device_memory_gb
    if device is None:
        tip = f": on a smaller GPU, the guide's memory preset needs ~{with_preset:.0f} GB" if patch else ""
        return Finding(
            rule="vram-estimate",
            severity="info",
            message=f"this run needs about {need:.0f} GB of GPU memory ({row}){tip}.",
            evidence=facts,
        )
    if need <= device:
        return None
    if with_preset <= device:
        fix = f"the guide's memory preset brings it to ~{with_preset:.0f} GB"
    else:
        fix = f"even the guide's memory preset needs ~{with_preset:.0f} GB: also lower the resolution"
    return Finding(
        rule="vram-estimate",
        severity="warning",
        message=f"this run needs about {need:.0f} GB of GPU memory but the device has {device:g} GB ({row}): {fix}.",
        evidence={**facts, "device_memory_gb": device},
        patch=patch,
    )


def resolution_below_native(evidence: RunEvidence) -> Finding | None:
    """Training below the model's native size is allowed (the guide: "Don't train at full model resolution
    always"), so this only says what it trades."""
    config, native = evidence.config, evidence.native_resolution
    if config.resolution is None or native is None or config.resolution >= native:
        return None
    ratio = pixel_ratio(config, native)
    return Finding(
        rule="resolution-below-native",
        severity="info",
        message=f"resolution {config.resolution} is below the model's native {native}px: each step has "
        f"{ratio:.0%} of the pixels (faster, less memory), but the LoRA learns less fine detail.",
        evidence={"resolution": config.resolution, "native_resolution": native, "pixel_ratio": round(ratio, 3)},
    )


def training_time_estimate(evidence: RunEvidence) -> Finding | None:
    if tiny_model(evidence.native_resolution):
        return None
    minutes = estimate_minutes(evidence.config, evidence.native_resolution, _images(evidence), evidence.model_family)
    if minutes is None:
        return None
    config = evidence.config
    family = model_family(config, evidence.native_resolution, evidence.model_family)
    steps = config.steps or STEPS_PER_IMAGE * _images(evidence)
    low, high = family.hardware_of(config.model_name).minutes_per_1k
    per_process = config.batch_size * config.gradient_accumulation_steps  # data-parallel processes run side by side
    return Finding(
        rule="time-estimate",
        severity="info",
        message=f"expect about {minutes[0]:.0f}-{minutes[1]:.0f} min for {steps} steps ({family.name}: "
        f"the guide's {low:g}-{high:g} min per 1k steps, scaled to {per_process} image(s) per step "
        "and the training resolution).",
        evidence={
            "steps": steps,
            "family": family.name,
            "minutes": [round(minutes[0], 1), round(minutes[1], 1)],
            "guide_minutes_per_1k": [low, high],
            "images_per_step": per_process,
        },
    )


PREFLIGHT_RULES: list[Callable[[RunEvidence], Finding | None]] = [
    steps_vs_images,
    learning_rate_band,
    alpha_above_rank,
    generic_trigger_word,
    rank_for_dataset,
    captions_missing_trigger,
    too_few_images,
    vram_estimate,
    resolution_below_native,
    training_time_estimate,
]


def preflight_findings(evidence: RunEvidence) -> list[Finding]:
    """Every pre-flight rule's finding for the run `evidence` describes."""
    return [finding for rule in PREFLIGHT_RULES if (finding := rule(evidence)) is not None]
