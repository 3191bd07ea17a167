"""What a run needs, from its model family's rows of the guide (training/families/: `hardware`): GPU
memory, training time, and the guide's memory preset as changes to a config. Pure functions of a config
and what is known of the model; the pre-flight rules (`training/diagnostics/preflight.py`) and the plans
(`training/plans.py`) report them."""

from __future__ import annotations

from training.config import TrainingConfig
from training.families import FAMILIES, ModelFamily, guess_family
from training.guide import DEFAULT_LEARNING_RATE, MEMORY_PRESET, SMALLEST_REAL_NATIVE, STANDARD_RANK, STEPS_PER_IMAGE

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
# low_vram, adafactor): SD 1.5 8 -> 6.0 GB, SDXL 16 -> 11.8, SD 2.x 11.3 -> 8.1, FLUX 24 -> 16.9. (The rows'
# weights are the real models' parameter counts: tests/test_full_size.py counts them on the meta device.)
CHECKPOINTED_ACTIVATIONS = 0.75


def model_family(config: TrainingConfig, native_resolution: int | None, detected: str | None = None) -> ModelFamily:
    """The config's model_family, else the family read from the model's files (`detected`: sd1, sd2, sdxl,
    flux), else the one its name and native size suggest (training/families guess_family)."""
    known = config.model_family if config.model_family != "auto" else detected
    if known:
        return FAMILIES[known]
    return guess_family(config.model_name, native_resolution)


def tiny_model(native_resolution: int | None) -> bool:
    """A built-in test model, which the guide's tables do not describe."""
    return native_resolution is not None and native_resolution < SMALLEST_REAL_NATIVE


def pixel_ratio(config: TrainingConfig, native: int) -> float:
    """Pixels per image against the model's native size: activations and compute scale with it."""
    return ((config.resolution or native) / native) ** 2


def estimate_vram_gb(config: TrainingConfig, native_resolution: int | None, detected: str | None = None) -> float:
    """GPU memory (GB) a run of `config` needs: weights + LoRA training state + activations.

    Anchor: the guide's recommended VRAM is the need at batch 1, native size, fp16/bf16 mixed precision,
    AdamW on a rank-32 LoRA, no checkpointing and no low_vram (the guide's examples use fp16; no row of its
    table holds the weights in fp32). What is not weights or LoRA state there is "activations", which scale
    with the micro-batch and the pixels per image."""
    row = model_family(config, native_resolution, detected).hardware_of(config.model_name)
    native = native_resolution or row.native
    fp32 = config.mixed_precision == "no"
    denoiser, quantized = row.denoiser_gb, row.quantized
    if quantized and config.quantize_base == "none":  # the guide's FLUX row is at 8 bits; 16 bits is twice that
        denoiser, quantized = 2 * denoiser, False
    weights = denoiser + (0.0 if config.low_vram else row.encoders_gb)
    if fp32 and not quantized:
        weights *= 2
    anchor_lora = _lora_state_gb(STANDARD_RANK, "adamw")
    activations = row.recommended_gb - row.denoiser_gb - row.encoders_gb - anchor_lora
    activations *= config.batch_size * pixel_ratio(config, native)
    if fp32:
        activations *= FP32_ACTIVATIONS
    if config.gradient_checkpointing:
        activations *= CHECKPOINTED_ACTIVATIONS
    return weights + _lora_state_gb(config.effective_rank, config.optimizer) + activations


def _lora_state_gb(rank: int, optimizer: str) -> float:
    return rank * LORA_PARAMS_PER_RANK * (8 + 4 * OPTIMIZER_STATES[optimizer]) / 1e9


def memory_preset_patch(config: TrainingConfig, family: ModelFamily) -> dict:
    """The guide's memory preset as changes to `config`, keeping the effective batch size, in the family's
    memory precision (FLUX: bf16 rather than fp16); for a family whose guide row assumes 8-bit weights
    (FLUX) also those."""
    patch: dict = {key: value for key, value in MEMORY_PRESET.items() if getattr(config, key) != value}
    if family.hardware_of(config.model_name).quantized and config.quantize_base == "none":
        patch["quantize_base"] = "8bit"
    if config.batch_size > 1:
        patch["gradient_accumulation_steps"] = min(256, config.batch_size * config.gradient_accumulation_steps)
    if config.mixed_precision == "no":
        patch["mixed_precision"] = family.memory_precision
    if "optimizer" in patch and config.optimizer == "prodigy":
        patch["learning_rate"] = DEFAULT_LEARNING_RATE  # Prodigy's 1.0 would be 5000x the guide's default
    return patch


def estimate_minutes(
    config: TrainingConfig, native_resolution: int | None, images: int | None, detected: str | None = None
) -> tuple[float, float] | None:
    """(low, high) minutes of training: the guide's "Training Time (1k steps)" for the model family x the
    steps (config.steps, else 100 x images), scaled by the images per step (batch x accumulation; the guide's
    times are at batch 1) and by the pixels per image against native size. None without a step count."""
    steps = config.steps or (STEPS_PER_IMAGE * images if images else None)
    if steps is None:
        return None
    row = model_family(config, native_resolution, detected).hardware_of(config.model_name)
    native = native_resolution or row.native
    # Per process: the processes of a data-parallel run work side by side.
    scale = steps / 1000 * config.batch_size * config.gradient_accumulation_steps * pixel_ratio(config, native)
    low, high = row.minutes_per_1k
    return low * scale, high * scale
