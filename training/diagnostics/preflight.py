"""Pre-flight rules: the guide's advice checked against a config (and what is known of its dataset and
model) before training starts. Each rule takes the run's `RunEvidence` and returns a `Finding` or None."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from training.config import STEPS_PER_IMAGE, TrainingConfig
from training.data.report import GUIDE_IMAGE_RANGE
from training.diagnostics.findings import Finding

if TYPE_CHECKING:
    from training.diagnostics.evidence import RunEvidence

# The guide's "Learning Rate" list: (value, the guide's words). Adaptive optimizers differ: Prodigy
# estimates its own step and wants lr 1.0.
LEARNING_RATES: dict[str, tuple[float, str]] = {
    "default": (2e-4, "Good for most cases"),
    "conservative": (1e-4, "Slower but safer"),
    "aggressive": (3e-4, "For stubborn concepts"),
    "fine_tuning": (5e-5, "For existing styles"),
}
GUIDE_LR_RANGE = (LEARNING_RATES["fine_tuning"][0], LEARNING_RATES["aggressive"][0])
DEFAULT_LR = LEARNING_RATES["default"][0]
PRODIGY_LR = 1.0
GENERIC_TRIGGERS = {"style", "person", "man", "woman", "character", "object", "concept", "art", "photo", "dog", "cat"}

# Rank against dataset size. The guide's "Rank Selection": 16-32 for standard character/style LoRAs
# (datasets of 10-100 images), 64-96 for complex concepts and multiple subjects, 128 for maximum detail
# (complex styles: 50-200 images). A rank of 64+ on under 30 images (128 on under 50) has 2-4x the
# parameters of a rank-32 LoRA with nothing more to learn from: it memorises the images, and the file
# grows from ~50 MB to ~150-300 MB. Checked in order: (smallest rank, fewest images it needs).
RANK_NEEDS_IMAGES = ((128, 50), (64, 30))
STANDARD_RANK = 32
# The guide's "Rank Selection" table: (lowest rank, highest rank, use case, approximate file size in MB).
RANK_TABLE: tuple[tuple[int, int, str, int], ...] = (
    (4, 8, "Simple style adjustments", 10),
    (16, 32, "Standard character/style LoRAs", 50),
    (64, 96, "Complex concepts, multiple subjects", 150),
    (128, 128, "Maximum detail/flexibility", 300),
)
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
        patch={"learning_rate": DEFAULT_LR},
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
def guide_file_mb(rank: int) -> int:
    """The LoRA file size the guide's rank table gives for `rank` (between rows: the next row's)."""
    return next((mb for _, highest, _, mb in RANK_TABLE if rank <= highest), RANK_TABLE[-1][3])


def rank_for_dataset(evidence: RunEvidence) -> Finding | None:
    """A large rank on a small dataset overfits and makes a big file (thresholds: RANK_NEEDS_IMAGES)."""
    config, images = evidence.config, _images(evidence)
    rank = config.effective_rank
    if not images:
        return None
    needed = next((n for min_rank, n in RANK_NEEDS_IMAGES if rank >= min_rank), None)
    if needed is None or images >= needed:
        return None
    # The kohya names win over rank/alpha, so the patch changes whichever name the config uses.
    patch: dict = {"network_dim" if config.network_dim is not None else "rank": STANDARD_RANK}
    given_alpha, alpha_key = (
        (config.network_alpha, "network_alpha") if config.network_alpha is not None else (config.alpha, "alpha")
    )
    if given_alpha is not None and given_alpha > STANDARD_RANK:
        patch[alpha_key] = float(STANDARD_RANK)
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
        patch=patch,
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
@dataclass(frozen=True)
class ModelFamily:
    """A row of the guide's "Required Hardware" table, with the weights the memory estimate splits off
    (public parameter counts, at 2 bytes per parameter unless `quantized`)."""

    name: str
    native: int
    minimum_gb: float
    recommended_gb: float
    minutes_per_1k: tuple[float, float]  # the guide's "Training Time (1k steps)"
    denoiser_gb: float  # the UNet or transformer
    encoders_gb: float  # text encoder(s) + VAE: what low_vram keeps off the GPU
    quantized: bool = False  # weights stored in 8 bits, whatever mixed_precision says
    from_guide: bool = True


SD15 = ModelFamily("SD 1.5", 512, 6, 8, (15, 30), denoiser_gb=1.7, encoders_gb=0.4)  # UNet 860M; CLIP-L + VAE 207M
# The guide has no SD 2.x row: its numbers are interpolated between SD 1.5 and SDXL by pixels (768^2 lies
# 42% of the way from 512^2 to 1024^2). UNet 865M; OpenCLIP-H + VAE 438M.
SD2 = ModelFamily("SD 2.x", 768, 8.5, 11.3, (21, 42), denoiser_gb=1.7, encoders_gb=0.9, from_guide=False)
SDXL = ModelFamily("SDXL", 1024, 12, 16, (30, 60), denoiser_gb=5.1, encoders_gb=1.8)  # UNet 2.6B; CLIP-L + bigG + VAE
# FLUX's 12B transformer alone is 24 GB at 16 bits, so the guide's 16/24 GB imply 8-bit weights (as ai-toolkit
# quantizes them): transformer 11.9 GB, T5-XXL 4.8 GB + CLIP-L and VAE 0.4 GB.
FLUX = ModelFamily("FLUX", 1024, 16, 24, (60, 120), denoiser_gb=11.9, encoders_gb=5.2, quantized=True)

# LoRA size: the guide's file sizes (~50 MB at rank 16-32, ~300 MB at 128) are ~2.4 MB per rank at 16 bits,
# i.e. ~1.2M parameters per rank. Training keeps each in fp32 with its fp32 gradient (8 bytes) plus the
# optimizer's state: fp32 values per parameter.
LORA_PARAMS_PER_RANK = 1.2e6
OPTIMIZER_STATES = {
    "adamw": 2.0,  # two moments
    "adamw8bit": 0.5,  # two moments at 8 bits
    "lion": 1.0,  # one momentum
    "sgd": 1.0,  # momentum 0.9 (training/optimizers.py)
    "prodigy": 4.0,  # two moments, its step-size accumulator and the initial weights
    "adafactor": 0.0,  # factored second moment (rows + columns) and no first moment: next to nothing
}
# Without mixed precision the frozen weights are fp32 (twice the bytes; trainer: weight dtype follows autocast),
# and activations grow ~1.5x: under autocast the conv/linear outputs are 16-bit but norms, softmax and residual
# sums are already fp32.
FP32_ACTIVATIONS = 1.5
# Gradient checkpointing keeps only block inputs and recomputes the rest in backward. It cannot free the CUDA
# context, attention workspaces or allocator slack that share the "activations" part of the estimate, and 0.75
# is what reproduces the guide's minimum from its recommended with the guide's memory preset (checkpointing,
# low_vram, adafactor): SD 1.5 8 -> 6.0 GB, SDXL 16 -> 11.8, SD 2.x 11.3 -> 8.1, FLUX 24 -> 16.9.
CHECKPOINTED_ACTIVATIONS = 0.75
# A native size under this is a tiny test model (builtin:tiny-*, 64 px), which the guide's table does not describe.
SMALLEST_REAL_NATIVE = 256
# The guide's "Memory Optimization" preset, as patch values.
MEMORY_PRESET = {"low_vram": True, "gradient_checkpointing": True, "batch_size": 1, "optimizer": "adafactor"}


def model_family(config: TrainingConfig, native_resolution: int | None, detected: str | None = None) -> ModelFamily:
    """The config's model_family, else the family read from the model's files (`detected`: sd1, sd2, sdxl,
    flux). Without either: FLUX by name (FLUX and its Flex derivatives), else by native size: 512 SD 1.5
    (smaller: a tiny test model, counted as SD 1.5), 768 SD 2.x, 1024+ SDXL-class; unknown size: by the
    name ('xl', 'sd2', 'stable-diffusion-2'), else SD 1.5 (the default model)."""
    known = config.model_family if config.model_family != "auto" else detected
    if known:
        return {"sd1": SD15, "sd2": SD2, "sdxl": SDXL, "flux": FLUX}[known]
    name = config.model_name.lower()
    if "flux" in name or "flex" in name:
        return FLUX
    if native_resolution is None:
        if re.search(r"(^|[^a-z])(sd)?xl([^a-z]|$)", name):
            return SDXL
        if re.search(r"stable-diffusion-2|(^|[^a-z])sd-?2|2[-.][01]([^0-9]|$)", name) and "base" not in name:
            return SD2  # the 768 px v-prediction models; the 2.x "base" models are 512 px
        return SD15
    if native_resolution <= 640:
        return SD15
    return SD2 if native_resolution <= 896 else SDXL


def _tiny_model(native_resolution: int | None) -> bool:
    return native_resolution is not None and native_resolution < SMALLEST_REAL_NATIVE


def _pixel_ratio(config: TrainingConfig, native: int) -> float:
    """Pixels per image against the model's native size: activations and compute scale with it."""
    return ((config.resolution or native) / native) ** 2


def estimate_vram_gb(config: TrainingConfig, native_resolution: int | None, detected: str | None = None) -> float:
    """GPU memory (GB) a run of `config` needs: weights + LoRA training state + activations.

    Anchor: the guide's recommended VRAM is the need at batch 1, native size, fp16/bf16 mixed precision,
    AdamW on a rank-32 LoRA, no checkpointing and no low_vram (the guide's examples use fp16; no row of its
    table holds the weights in fp32). What is not weights or LoRA state there is "activations", which scale
    with the micro-batch and the pixels per image."""
    family = model_family(config, native_resolution, detected)
    native = native_resolution or family.native
    fp32 = config.mixed_precision == "no"
    denoiser, quantized = family.denoiser_gb, family.quantized
    if quantized and config.quantize_base == "none":  # the guide's FLUX row is at 8 bits; 16 bits is twice that
        denoiser, quantized = 2 * denoiser, False
    weights = denoiser + (0.0 if config.low_vram else family.encoders_gb)
    if fp32 and not quantized:
        weights *= 2
    anchor_lora = _lora_state_gb(STANDARD_RANK, "adamw")
    activations = family.recommended_gb - family.denoiser_gb - family.encoders_gb - anchor_lora
    activations *= config.batch_size * _pixel_ratio(config, native)
    if fp32:
        activations *= FP32_ACTIVATIONS
    if config.gradient_checkpointing:
        activations *= CHECKPOINTED_ACTIVATIONS
    return weights + _lora_state_gb(config.effective_rank, config.optimizer) + activations


def _lora_state_gb(rank: int, optimizer: str) -> float:
    return rank * LORA_PARAMS_PER_RANK * (8 + 4 * OPTIMIZER_STATES[optimizer]) / 1e9


def memory_preset_patch(config: TrainingConfig, family: ModelFamily | None = None) -> dict:
    """The guide's memory preset as changes to `config`, keeping the effective batch size; for FLUX also
    8-bit transformer weights, which the guide's FLUX row assumes, and bf16 rather than fp16."""
    patch: dict = {key: value for key, value in MEMORY_PRESET.items() if getattr(config, key) != value}
    if family is FLUX and config.quantize_base == "none":
        patch["quantize_base"] = "8bit"
    if config.batch_size > 1:
        patch["gradient_accumulation_steps"] = min(256, config.effective_batch_size)
    if config.mixed_precision == "no":  # FLUX's activations overflow fp16 (SD's and SDXL's UNets run in it)
        patch["mixed_precision"] = "bf16" if family is FLUX else "fp16"
    if "optimizer" in patch and config.optimizer == "prodigy":
        patch["learning_rate"] = DEFAULT_LR  # Prodigy's 1.0 would be 5000x the guide's default for Adafactor
    return patch


def vram_estimate(evidence: RunEvidence) -> Finding | None:
    """The estimate against the device's memory: a warning with the memory preset when it does not fit;
    with the device unknown, the estimate and the guide's row as information."""
    config = evidence.config
    if _tiny_model(evidence.native_resolution):
        return None
    family = model_family(config, evidence.native_resolution, evidence.model_family)
    need = estimate_vram_gb(config, evidence.native_resolution, evidence.model_family)
    patch = memory_preset_patch(config, family)
    with_preset = estimate_vram_gb(config.model_copy(update=patch), evidence.native_resolution, evidence.model_family)
    row = f"{family.name}: the guide's minimum {family.minimum_gb:g} GB, recommended {family.recommended_gb:g} GB"
    if not family.from_guide:
        row = row.replace("the guide's", "interpolated from the guide,")
    facts = {
        "estimate_gb": round(need, 1),
        "with_memory_preset_gb": round(with_preset, 1),
        "family": family.name,
        "guide_minimum_gb": family.minimum_gb,
        "guide_recommended_gb": family.recommended_gb,
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
    ratio = _pixel_ratio(config, native)
    return Finding(
        rule="resolution-below-native",
        severity="info",
        message=f"resolution {config.resolution} is below the model's native {native}px: each step has "
        f"{ratio:.0%} of the pixels (faster, less memory), but the LoRA learns less fine detail.",
        evidence={"resolution": config.resolution, "native_resolution": native, "pixel_ratio": round(ratio, 3)},
    )


def estimate_minutes(
    config: TrainingConfig, native_resolution: int | None, images: int | None, detected: str | None = None
) -> tuple[float, float] | None:
    """(low, high) minutes of training: the guide's "Training Time (1k steps)" for the model family x the
    steps (config.steps, else 100 x images), scaled by the images per step (batch x accumulation; the guide's
    times are at batch 1) and by the pixels per image against native size. None without a step count."""
    steps = config.steps or (STEPS_PER_IMAGE * images if images else None)
    if steps is None:
        return None
    family = model_family(config, native_resolution, detected)
    native = native_resolution or family.native
    scale = steps / 1000 * config.effective_batch_size * _pixel_ratio(config, native)
    low, high = family.minutes_per_1k
    return low * scale, high * scale


def training_time_estimate(evidence: RunEvidence) -> Finding | None:
    if _tiny_model(evidence.native_resolution):
        return None
    minutes = estimate_minutes(evidence.config, evidence.native_resolution, _images(evidence), evidence.model_family)
    if minutes is None:
        return None
    config = evidence.config
    family = model_family(config, evidence.native_resolution, evidence.model_family)
    steps = config.steps or STEPS_PER_IMAGE * _images(evidence)
    low, high = family.minutes_per_1k
    return Finding(
        rule="time-estimate",
        severity="info",
        message=f"expect about {minutes[0]:.0f}-{minutes[1]:.0f} min for {steps} steps ({family.name}: "
        f"the guide's {low:g}-{high:g} min per 1k steps, scaled to {config.effective_batch_size} image(s) per step "
        "and the training resolution).",
        evidence={
            "steps": steps,
            "family": family.name,
            "minutes": [round(minutes[0], 1), round(minutes[1], 1)],
            "guide_minutes_per_1k": [low, high],
            "images_per_step": config.effective_batch_size,
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
