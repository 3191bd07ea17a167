"""Pre-flight rules: the guide's advice checked against a config before training starts."""

from __future__ import annotations

from collections.abc import Callable

from training.config import STEPS_PER_IMAGE, TrainingConfig
from training.diagnostics.findings import Finding

# The guide: "Default: 2e-4, Conservative: 1e-4, Aggressive: 3e-4, Fine-tuning: 5e-5". Adaptive
# optimizers differ: Prodigy estimates its own step and wants lr 1.0.
GUIDE_LR_RANGE = (5e-5, 3e-4)
PRODIGY_LR = 1.0
GENERIC_TRIGGERS = {"style", "person", "man", "woman", "character", "object", "concept", "art", "photo", "dog", "cat"}


def steps_vs_images(config: TrainingConfig, images: int | None) -> Finding | None:
    """The guide's rule of thumb: 100 steps per image; far off either way under- or overtrains."""
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


def learning_rate_band(config: TrainingConfig, images: int | None) -> Finding | None:
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
        patch={"learning_rate": 2e-4},
    )


def alpha_above_rank(config: TrainingConfig, images: int | None) -> Finding | None:
    rank, alpha = config.effective_rank, config.effective_alpha
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


def generic_trigger_word(config: TrainingConfig, images: int | None) -> Finding | None:
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


PREFLIGHT_RULES: list[Callable[[TrainingConfig, int | None], Finding | None]] = [
    steps_vs_images,
    learning_rate_band,
    alpha_above_rank,
    generic_trigger_word,
]


def preflight_findings(config: TrainingConfig, images: int | None) -> list[Finding]:
    """Every pre-flight rule's finding for `config` on a dataset of `images` images."""
    return [finding for rule in PREFLIGHT_RULES if (finding := rule(config, images)) is not None]
