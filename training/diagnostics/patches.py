"""Config patches that more than one family of rules proposes as a fix: the sample rules (training_rules.py),
the failure rules (failure_rules.py) and the evaluation rules (evaluation_rules.py) answer the same causes
(a learning rate off the guide's range, a LoRA without effect, memorising, style bleeding) with the same
changes, so each change is written once, here.
"""

from __future__ import annotations

from training.config import TrainingConfig
from training.guide import GUIDE_LR_RANGE

DROPOUT_AGAINST_OVERFITTING = 0.1  # the guide: "Add dropout (0.1-0.3)"
DROPOUT_AGAINST_COPYING = 0.2  # the middle of the guide's 0.1-0.3
STEPS_MAX = 1_000_000  # TrainingConfig.steps' upper limit


def lr_patch(config: TrainingConfig, factor: float) -> dict:
    """learning_rate times `factor`, brought into the guide's range 5e-5 (fine-tuning) to 3e-4 (aggressive):
    raising 1e-9 gives 5e-5, not 2e-9, and lowering 10 gives 3e-4, not 5. Empty for Prodigy (it sets its
    own step and the pre-flight rule wants its lr at 1.0) or where the range leaves nothing to change."""
    if config.optimizer == "prodigy":
        return {}
    low, high = GUIDE_LR_RANGE
    lr = config.learning_rate
    new = float(f"{min(max(lr * factor, low), high):.3g}")
    moved = new > lr if factor > 1 else new < lr
    return {"learning_rate": new} if moved else {}


def dropout_patch(config: TrainingConfig, dropout: float) -> dict:
    """LoRA dropout raised to `dropout` (DROPOUT_AGAINST_*); empty where the config already has as much."""
    return {"dropout": dropout} if config.dropout < dropout else {}


def no_effect_patch(config: TrainingConfig) -> dict:
    """Against a LoRA without effect (the sample rule and the evaluation's): twice the learning rate, half
    again the steps."""
    patch = lr_patch(config, 2.0)
    if config.steps and config.steps < STEPS_MAX:
        patch["steps"] = min(STEPS_MAX, round(config.steps * 1.5))
    return patch


def bleeding_patch(config: TrainingConfig) -> dict:
    """Against style bleeding: prior preservation, only where a class_prompt makes it valid."""
    return {"prior_preservation": True} if config.class_prompt is not None and not config.prior_preservation else {}
