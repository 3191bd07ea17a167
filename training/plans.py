"""A first training plan from the guide's numbers: steps, learning rate, rank and alpha for the kind
of LoRA, a goal's preset (the guide's "Optimization Techniques"), and what to expect afterwards
(file size, strengths to use it at, training time).

Pure: everything comes in as arguments (the image count, the model's native resolution, a dataset
index already read), so the rules can be tested table by table. The MCP service that reads the
dataset and the model is `server/plans.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field

from training.config import TrainingConfig
from training.data.dataset import DatasetIndex, shared_first_word
from training.estimates import estimate_minutes, model_family
from training.families import ModelFamily
from training.guide import (
    CLASS_PROMPTS,
    CONSERVATIVE_LEARNING_RATE,
    GUIDE_IMAGE_RANGE,
    GUIDE_STRENGTHS,
    LEARNING_RATES,
    RANK_BY_TYPE,
    SMALLEST_REAL_NATIVE,
    STEPS_PER_IMAGE,
    STRENGTH_ROW,
    LoraType,
    lr_text,
    rank_row,
)

Goal = Literal["balanced", "memory", "speed", "quality"]
GOALS: tuple[str, ...] = get_args(Goal)

# The guide: "Single image -> 100-500 steps". 100 x 1 is that range's floor; we take its middle.
SINGLE_IMAGE_STEPS = 300



# The guide's "Optimization Techniques", key for key, each with the guide's own comment or heading quoted.
# Quality's "steps": 5000 is not taken over (see _steps): the guide's own steps rule gives 5000 only for 50 images.
GOAL_PRESETS: dict[str, dict[str, tuple[Any, str]]] = {
    "balanced": {},
    "memory": {
        "low_vram": (
            True,
            "the guide's Memory Optimization ('For limited VRAM'): the text encoders stay on the CPU and "
            "the VAE off the GPU except while it encodes or decodes (CUDA only)",
        ),
        "gradient_checkpointing": (
            True,
            "the guide's Memory Optimization: activations are recomputed in the "
            "backward pass instead of kept (less memory, slower steps)",
        ),
        "batch_size": (1, "the guide's Memory Optimization: one image per micro-batch (also the default)"),
        "gradient_accumulation_steps": (
            4,
            "the guide's Memory Optimization: 4 micro-batches per optimizer step, an "
            "effective batch of 4 for the memory of 1; each step takes about 4x as long",
        ),
        "mixed_precision": (
            "fp16",
            "the guide's Memory Optimization: fp16 autocast (on a CPU slower than fp32: use 'no' there)",
        ),
        "optimizer": ("adafactor", "the guide's Memory Optimization: 'Uses less memory than AdamW'"),
    },
    "speed": {
        "disable_sampling": (
            True,
            "the guide's Speed Optimization: 'Skip sample generation' (no sample images to "
            "judge progress by; turn it off to watch the LoRA form)",
        ),
        "save_every": (500, "the guide's Speed Optimization: 'Less frequent saves'"),
        "optimizer": (
            "lion",
            "the guide's Speed Optimization: 'Faster convergence'. It needs the optional package lion-pytorch "
            "(pip install lion-pytorch, or the project's [lion] extra): without it the run stops at set-up with "
            "OptimizerUnavailable saying what to install; choose optimizer adamw instead if you cannot install "
            "it. Not from the guide: Lion's authors advise a learning rate 3-10x below AdamW's; if the loss "
            f"oscillates, use the guide's conservative {lr_text(CONSERVATIVE_LEARNING_RATE)}",
        ),
        "lr_scheduler": ("constant", "the guide's Speed Optimization: 'Simple scheduler' (also the default)"),
        "cache_latents": (True, "the guide's Speed Optimization: 'Pre-compute VAE encodings' (also the default)"),
    },
    "quality": {
        "rank": (
            64,
            "the guide's Quality Optimization: rank 64 (its 64-96 band, 'Complex concepts, multiple subjects'). On a "
            "small dataset a rank this high can memorise the images: if validate-training-config flags it, go back "
            "to the kind's own rank",
        ),
        "alpha": (
            32,
            "the guide's Quality Optimization: 'Lower than rank for regularization' (updates scaled by 32/64 = 0.5)",
        ),
        "learning_rate": (
            CONSERVATIVE_LEARNING_RATE,
            f"the guide's Quality Optimization: {lr_text(CONSERVATIVE_LEARNING_RATE)} (its 'Conservative: "
            f"{lr_text(CONSERVATIVE_LEARNING_RATE)} - {LEARNING_RATES['conservative'][1]}')",
        ),
        "lr_scheduler": ("cosine_with_restarts", "the guide's Quality Optimization: cosine_with_restarts"),
        "sample_every": (
            100,
            "the guide's Quality Optimization: samples every 100 steps, to catch the best checkpoint",
        ),
        "save_every": (250, "the guide's Quality Optimization: a checkpoint every 250 steps (also the default)"),
        "prior_preservation": (
            True,
            "the guide's Quality Optimization: prior preservation keeps the subject's class "
            "looking like itself. Before step 1 the run generates num_class_images (default 100) class images with the "
            "base model, which takes a while",
        ),
    },
}
assert set(GOAL_PRESETS) == set(GOALS)

class Strengths(BaseModel):
    model: tuple[float, float] = Field(description="LoRA strength on the UNet (ComfyUI strength_model): low, high.")
    clip: tuple[float, float] = Field(description="LoRA strength on the text encoder (strength_clip): low, high.")
    note: str = Field(description="Which row of the guide's table this is, and where to start.")


class LearningRateOption(BaseModel):
    value: float
    when: str = Field(description="The guide's words for when to use it.")


class TrainingPlan(BaseModel):
    goal: Goal
    lora_type: LoraType
    images: int = Field(description="Training images in the dataset (validation excluded), as the trainer counts them.")
    config: dict[str, Any] = Field(
        description="Arguments for create-training-config, as they are; every option left out keeps its default."
    )
    reasons: dict[str, str] = Field(description="For each value chosen (and each estimate), why, quoting the guide.")
    expected_file_size_mb: int = Field(description="The guide's approximate LoRA file size for this rank.")
    strengths: Strengths = Field(description="Strengths to use the finished LoRA at (the guide's table).")
    estimated_minutes: tuple[float, float] = Field(
        description="Training time range on the guide's recommended GPU, from its 'Training Time (1k steps)'."
    )
    dataset_advice: str = Field(description="The image count against the guide's range for this kind of LoRA.")
    learning_rate_options: dict[str, LearningRateOption] = Field(
        description="The guide's four learning rates, to change learning_rate with update-training-config."
    )
    warnings: list[str] = Field(description="What to know before training with this plan; empty when nothing.")
    next_step: str


@dataclass(frozen=True)
class TriggerChoice:
    word: str | None  # None: the dataset's concept folders trigger themselves
    reason: str


def recommend_plan(
    *,
    images: int,
    lora_type: LoraType,
    goal: Goal,
    model_name: str,
    native_resolution: int | None,
    dataset_path: str,
    name: str,
    trigger_word: str | None,
    trigger_reason: str | None = None,
    detected_family: str | None = None,
) -> TrainingPlan:
    """The plan for `images` training images of a `lora_type` LoRA on `model_name` (whose native size
    is `native_resolution`, None when unknown; `detected_family` as read from its files, else judged by
    name and size), with `goal`'s preset. Its config validates as a TrainingConfig (checked here)."""
    if images < 1:
        raise ValueError(f"a plan needs at least one training image, not {images}")
    if lora_type not in RANK_BY_TYPE:
        raise ValueError(f"unknown lora_type {lora_type!r}: one of {', '.join(RANK_BY_TYPE)}")
    if goal not in GOAL_PRESETS:
        raise ValueError(f"unknown goal {goal!r}: one of {', '.join(GOALS)}")

    steps, steps_reason = _steps(images, goal)
    rank, rank_reason = RANK_BY_TYPE[lora_type]
    learning_rate, lr_words = LEARNING_RATES["default"]
    config: dict[str, Any] = {
        "name": name,
        "model_name": model_name,
        "dataset_path": dataset_path,
        "trigger_word": trigger_word,
        "lora_type": lora_type,
        "steps": steps,
        "learning_rate": learning_rate,
        "rank": rank,
        "alpha": rank,
    }
    reasons = {
        "name": f"{name!r}: the run's name and the LoRA's file name ({name}.safetensors)",
        "dataset_path": f"the dataset {dataset_path!r}: {images} training image(s), validation excluded",
        "trigger_word": trigger_reason
        or (
            f"{trigger_word!r}: put first in every caption that lacks it; the guide: 'Use unique trigger words "
            '(xyz_style, not "style")\''
            if trigger_word
            else "not set: every image is in a concept folder, whose name is its trigger word"
        ),
        "lora_type": f"{lora_type}: recorded in the config for the diagnostics' dataset-size advice and the "
        "recommended strengths",
        "steps": steps_reason,
        "learning_rate": f"{learning_rate:g}, the guide's 'Default: {lr_text(learning_rate)} ({learning_rate:g}) - "
        f"{lr_words}'",
        "rank": f"{rank}: {rank_reason}",
        "alpha": f"{rank}, equal to rank (updates scaled by alpha/rank = 1), as in the guide's examples "
        "('rank': 32, 'alpha': 32)",
    }
    if trigger_word is None:
        del config["trigger_word"]
    for key, (value, why) in GOAL_PRESETS[goal].items():
        if key == "prior_preservation" and lora_type not in CLASS_PROMPTS:
            reasons[key] = (
                f"left off, although the guide's Quality Optimization sets it: prior preservation keeps a subject's "
                f"class (e.g. 'person') from drifting and needs a class_prompt, and a {lora_type} LoRA has no such "
                "class. Set prior_preservation true with a class_prompt if yours has one"
            )
            continue
        if key in ("rank", "learning_rate"):
            why = f"{why}; without the quality goal it would be {reasons[key]}"
        config[key] = value
        reasons[key] = why
    if config.get("prior_preservation"):
        config["class_prompt"] = CLASS_PROMPTS[lora_type]
        reasons["class_prompt"] = (
            f"{CLASS_PROMPTS[lora_type]!r}: the generic class of a {lora_type}, which prior preservation needs (the "
            "guide's DreamBooth example uses class_prompt 'person'); a narrower class (e.g. 'a photo of a car', "
            "'an anime girl') preserves better"
        )
    family = model_family(TrainingConfig.from_dict(config), native_resolution, detected_family)
    if "mixed_precision" not in config:
        config["mixed_precision"], reasons["mixed_precision"] = family.default_precision()
    elif config["mixed_precision"] != family.memory_precision:  # the memory preset's fp16 overflows in FLUX
        config["mixed_precision"], why = family.default_precision()
        reasons["mixed_precision"] = f"{why}; the guide's Memory Optimization writes fp16, which saves no more"
    if "optimizer" not in config:  # the memory and speed presets set their own
        config["optimizer"], reasons["optimizer"] = family.default_optimizer()
    if native_resolution is None or native_resolution >= SMALLEST_REAL_NATIVE:  # not a built-in tiny model
        if family.plan_quantize_reason:
            config["quantize_base"] = "8bit"
            reasons["quantize_base"] = family.plan_quantize_reason
        for key, (value, why) in family.plan_settings.items():
            config[key], reasons[key] = value, why
    # A config that would be refused is a bug here, not the user's problem; the validated one also
    # supplies the defaults (batch size) the estimates need.
    validated = TrainingConfig.from_dict(config)

    size_mb, size_reason = file_size_mb(validated.effective_rank)
    reasons["expected_file_size_mb"] = size_reason
    family = model_family(validated, native_resolution, detected_family)
    reasons["model_name"] = f"{model_name}: {_family_reason(family, native_resolution)}"
    low, high = estimate_minutes(validated, native_resolution, images, detected_family)
    minutes = (round(low, 1), round(high, 1))
    per_step = validated.effective_batch_size
    batches = f" x {per_step} images per step (batch_size x gradient_accumulation_steps)" if per_step > 1 else ""
    hardware = family.hardware_of(validated.model_name)
    row = f"the guide's {family.name} row" if hardware.from_guide else f"{family.name}'s row ({hardware.estimated})"
    reasons["estimated_minutes"] = (
        f"{minutes[0]:g}-{minutes[1]:g} min: {row}, {hardware.minutes_per_1k[0]:g}-"
        f"{hardware.minutes_per_1k[1]:g} min per 1k steps ('Training Time (1k steps)', on its recommended GPUs) x "
        f"{steps / 1000:g}k steps{batches}; gradient checkpointing, class-image generation and a CPU make it longer"
    )
    warnings = []
    next_step = (
        f"create-training-config with `config` as its arguments (change any value first if you like), then "
        f"validate-training-config with name {name!r}, then start-training with config_name {name!r}"
    )
    return TrainingPlan(
        goal=goal,
        lora_type=lora_type,
        images=images,
        config=config,
        reasons=reasons,
        expected_file_size_mb=size_mb,
        strengths=strengths_for(lora_type),
        estimated_minutes=minutes,
        dataset_advice=dataset_advice(images, lora_type),
        learning_rate_options={
            key: LearningRateOption(value=value, when=when) for key, (value, when) in LEARNING_RATES.items()
        },
        warnings=warnings,
        next_step=next_step,
    )


def file_size_mb(rank: int) -> tuple[int, str]:
    """The guide's approximate file size for `rank`: its band's figure, or the next band's between bands."""
    low, high, use, size = rank_row(rank)
    band = f"{low}-{high}" if low != high else str(low)
    where = "above" if rank > high else "in" if rank >= low else "just below"
    return size, (
        f"~{size} MB: the guide's approximate figure for rank {band} ('{use}'), which rank {rank} is {where}; the "
        "real size depends on the model and on train_text_encoder (the built-in tiny test models give files of "
        "a few hundred KB)"
    )


def strengths_for(lora_type: LoraType) -> Strengths:
    row, why = STRENGTH_ROW[lora_type]
    model, clip = GUIDE_STRENGTHS[row]
    table = f"the guide's 'Optimal Strength Settings' row for {row.capitalize()} LoRAs"
    source = f"{table}; a {lora_type} LoRA has no row of its own, and the nearest is {row}: {why}" if why else table
    start = f"{(model[0] + model[1]) / 2:.2f}/{(clip[0] + clip[1]) / 2:.2f}"
    return Strengths(
        model=model,
        clip=clip,
        note=f"{source}. Start in the middle (model/CLIP {start}); lower it if the LoRA takes over the image, "
        "raise it if it barely shows",
    )


def dataset_advice(images: int, lora_type: LoraType) -> str:
    low, high = GUIDE_IMAGE_RANGE[lora_type]
    guide = f"the guide's {low}-{high} for a {lora_type} LoRA ('Dataset Size Guidelines')"
    if images < low:
        return (
            f"too few: {images} image(s), below {guide}; add {low - images} or more varied images (angles, "
            "lighting, settings) if you can, and with fewer watch the samples for overfitting"
        )
    if images > high:
        return (
            f"more than needed: {images} images, above {guide}; curate the best {high}, or keep them all for a longer "
            "run (100 steps per image)"
        )
    return f"good: {images} images is within {guide}"


def trigger_word_for(dataset_name: str, index: DatasetIndex) -> TriggerChoice:
    """The trigger word a dataset already has, else one made from its name, as the trainer will use it:
    a concept folder by its own trigger (training.data.dataset.concept_trigger), root images by the config's
    trigger_word."""
    folders = [c for c in index.concepts if c.folder]
    has_root = any(not c.folder for c in index.concepts)
    if not has_root and len(folders) == 1:
        concept = folders[0]
        return TriggerChoice(
            concept.trigger_word,
            f"{concept.trigger_word!r}: the trigger of the dataset's one concept folder ({concept.folder!r}), which "
            f"the trainer uses ({concept.trigger_reason})",
        )
    named = ", ".join(f"{c.folder} -> {c.trigger_word}" for c in folders)
    if not has_root:
        return TriggerChoice(
            None,
            f"not set: the dataset's {len(folders)} concept folders each have their own trigger ({named}); "
            "set trigger_words ({folder: word}) to change them",
        )
    found = shared_first_word([r.caption for r in index.images if not r.folder])
    also = f"; the concept folders keep their own ({named})" if folders else ""
    if found:
        return TriggerChoice(found, f"{found!r}: already the first word of every caption{also}")
    derived = derived_trigger_word(dataset_name)
    return TriggerChoice(
        derived,
        f"{derived!r}: the captions share no trigger word, so one is made from the dataset's name in the guide's "
        f"form ('xyz_style', 'xyz_person'; 'Use unique trigger words'); the trainer puts it first in every caption "
        f"that lacks it{also}",
    )


def derived_trigger_word(dataset_name: str) -> str:
    """'xyz_<name>' in lower case with runs of other characters as '_' ('My-Set.2' -> 'xyz_my_set_2')."""
    stem = re.sub(r"[^a-z0-9]+", "_", dataset_name.lower()).strip("_") or "concept"
    return stem if stem.startswith("xyz_") else f"xyz_{stem}"


def _steps(images: int, goal: str) -> tuple[int, str]:
    if images == 1:
        steps = SINGLE_IMAGE_STEPS
        why = (
            f"{steps} for a single image: the middle of the guide's 'Single image -> 100-500 steps' (its 'Optimal "
            "Steps = 100 x number_of_images' gives only the range's floor, 100)"
        )
    else:
        steps = STEPS_PER_IMAGE * images
        why = f"{STEPS_PER_IMAGE} x {images} images = {steps} (the guide's 'Optimal Steps = 100 x number_of_images')"
    if goal == "quality":
        why += (
            "; the guide's Quality Optimization example says steps 5000, which is that same rule at 50 images "
            "('50 images -> 5000 steps'), so the rule is kept for this dataset's size"
        )
    if goal == "memory":
        why += (
            "; with gradient_accumulation_steps 4 each step sees 4 images, so the run goes through the data 4x as "
            "often as at batch 1: if samples look overfit early, lower steps"
        )
    return steps, why


def _family_reason(family: ModelFamily, native: int | None) -> str:
    if native is None:
        return (
            f"its native resolution was not read (no model named, or a single file without base_model_config); "
            f"{family.name}-class by its name"
        )
    if native < SMALLEST_REAL_NATIVE:
        return (
            f"native {native} px, a tiny test model: planned as {family.name}-class (the time figures are "
            f"{family.name}'s; it really trains in seconds to minutes)"
        )
    return f"native {native} px: {family.name}-class"
