"""Optimizers and learning-rate schedules by config name."""

from __future__ import annotations

import importlib
from typing import Any

import torch

# Optional optimizers: (module, attribute, pip package, extra of this project)
_OPTIONAL = {
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", "adamw8bit"),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch", "lion"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt", "prodigy"),
}


class OptimizerUnavailable(RuntimeError):
    """The optimizer's package is not installed; the message says what to install."""


def build_optimizer(name: str, param_groups: list[dict[str, Any]], learning_rate: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=learning_rate, weight_decay=1e-2)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=learning_rate, momentum=0.9)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # Fixed lr (the schedule comes from lr_scheduler), as kohya runs it for LoRA.
        return Adafactor(param_groups, lr=learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    module_name, attribute, package, extra = _OPTIONAL[name]
    try:
        optimizer_class = getattr(importlib.import_module(module_name), attribute)
    except ImportError as exc:
        raise OptimizerUnavailable(
            f"optimizer '{name}' needs the {package} package, which is not installed: "
            f"pip install {package}  (or pip install 'lora-mcp[{extra}]'), or choose optimizer: adamw"
        ) from exc
    if name == "prodigy":
        # Prodigy estimates the step size itself; learning_rate scales it (the guide: use 1.0).
        return optimizer_class(param_groups, lr=learning_rate, weight_decay=1e-2, safeguard_warmup=True)
    return optimizer_class(param_groups, lr=learning_rate, weight_decay=1e-2)


def build_lr_scheduler(
    name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, num_cycles: int
):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
        num_cycles=num_cycles,
    )
