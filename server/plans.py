"""recommend-training-plan: the guide's numbers for one dataset, as arguments for create-training-config.

The dataset's images are counted as the trainer counts them (`scan_dataset`: every image decoded,
validation held out) and the model's native size is read from its config files, as
validate-training-config reads it; the rules themselves are `training/plans.py`.

Choices made here:
- An unknown model is a ServiceError: a plan for a model the run cannot find would only fail at
  validate-training-config. Without model_name the plan is for the config's default model, which is
  not looked up (that could start a download); validate-training-config checks it later.
- The config is named '<dataset>-<lora_type>', with '-2', '-3', ... when a config of that name exists,
  so create-training-config accepts the plan's config as it is.
- The trigger word is the one the dataset already has (its one concept folder's trigger, or a word
  every caption starts with), else 'xyz_<dataset name>': see `trigger_word_for`.

Nothing heavy is imported at import time: the server imports this module at start-up.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import get_args

from server.configs import ConfigService, check_model
from server.errors import ServiceError, WorkspaceStateError
from server.inspection import dataset_folder
from server.names import free_name
from training.config import LoraType, TrainingConfig
from training.data.dataset import DatasetError, scan_dataset
from training.plans import GOALS, Goal, TrainingPlan, recommend_plan, trigger_word_for

# Optimizers a preset may choose that need a package of their own: optimizer -> (module, pip package).
_OPTIONAL_OPTIMIZERS = {"lion": ("lion_pytorch", "lion-pytorch")}
_QUANTIZERS = ("bitsandbytes", "torchao")  # either gives quantize_base 8bit (training/models/loading.py)


def recommend_training_plan(
    workspace: Path,
    *,
    dataset_name: str,
    lora_type: LoraType,
    model_name: str | None = None,
    goal: Goal = "balanced",
) -> TrainingPlan:
    """The plan for the dataset `dataset_name` in `workspace`, as a `lora_type` LoRA on `model_name`
    (default: the config's default model), with `goal`'s preset from the guide."""
    if lora_type not in get_args(LoraType):
        raise ServiceError(f"lora_type {lora_type!r} is not known: use one of {', '.join(get_args(LoraType))}")
    if goal not in GOALS:
        raise ServiceError(
            f"goal {goal!r} is not known: use balanced (the guide's defaults), memory (limited VRAM), speed "
            "(faster training) or quality (best results)"
        )
    folder = dataset_folder(workspace, dataset_name)
    try:
        index = scan_dataset(folder, trigger_word=None, trigger_words={})
    except DatasetError as exc:
        raise WorkspaceStateError(f"dataset {dataset_name!r} cannot be planned for: {exc}") from None
    except OSError as exc:
        raise WorkspaceStateError(f"dataset {dataset_name!r} cannot be read: {exc}") from None

    if model_name is None:
        model_name, native, family = TrainingConfig.model_fields["model_name"].default, None, None
    else:
        native, family = _model_facts(model_name)
    trigger = trigger_word_for(dataset_name, index)
    plan = recommend_plan(
        images=index.num_images,
        lora_type=lora_type,
        goal=goal,
        model_name=model_name,
        native_resolution=native,
        detected_family=family,
        dataset_path=dataset_name,
        name=free_name(dataset_name, ConfigService(workspace).exists, suffix=f"-{lora_type}"),
        trigger_word=trigger.word,
        trigger_reason=trigger.reason,
    )
    plan.warnings.extend(_missing_packages(plan.config.get("optimizer")))
    if plan.config.get("quantize_base") == "8bit" and not any(map(importlib.util.find_spec, _QUANTIZERS)):
        plan.warnings.append(
            "quantize_base 8bit needs bitsandbytes (CUDA) or torchao, and neither is installed here: pip install "
            "bitsandbytes (or torchao) where the run trains, or set quantize_base to none on a 40+ GB GPU"
        )
    plan.warnings.extend(f"dataset: {warning}" for warning in index.warnings)
    return plan


def _model_facts(model_name: str) -> tuple[int | None, str | None]:
    """The model's native size (None for a single file) and family from its files, as
    validate-training-config reads them; a model that cannot be found is a ServiceError."""
    errors: list[str] = []
    native, family = check_model(model_name, None, errors=errors)
    if errors:
        raise ServiceError(
            f"{'; '.join(errors)}. Plan for a model this machine has (a local diffusers folder, a .safetensors "
            "file, a Hugging Face id in the local cache, or 'builtin:tiny-sd15'), or leave model_name out to plan "
            "for the default model"
        )
    return native, family


def _missing_packages(optimizer: str | None) -> list[str]:
    if optimizer not in _OPTIONAL_OPTIMIZERS:
        return []
    module, package = _OPTIONAL_OPTIMIZERS[optimizer]
    if importlib.util.find_spec(module) is not None:
        return []
    return [
        f"optimizer {optimizer} needs the {package} package, which is not installed here: pip install {package}, "
        "or set optimizer to adamw before training"
    ]
