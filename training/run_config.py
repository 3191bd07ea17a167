"""The config a run trains with: the user's config with the loaded model's and the scanned dataset's
defaults filled in (TrainingConfig.resolve), checked against what that model can do. Trainer.setup makes it
once the model and the dataset are loaded, and writes it as the run's config.yaml.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from training.config import ConfigError, TrainingConfig

if TYPE_CHECKING:
    from training.data.dataset import DatasetIndex
    from training.models.loading import LoadedModel

log = logging.getLogger("training")


def resolve_run_config(
    config: TrainingConfig, base: LoadedModel, dataset: DatasetIndex
) -> tuple[TrainingConfig, list[str]]:
    """(the run's config, the warnings about the user's config and the dataset). The warnings are taken
    before resolve() folds network_dim / network_alpha into rank / alpha, so that a clash is still seen."""
    captions = [record.caption for record in dataset.images]
    warnings = config.warnings(captions) + dataset.warnings
    resolved = config.resolve(
        native_resolution=base.native_resolution,
        num_images=dataset.num_images,
        family=base.family,
        captions=captions,
        sample_guidance=base.family_rules.loaded_sample_guidance(base.pipeline),
    )
    _check_against_model(resolved, base)
    return resolved, warnings


def _check_against_model(config: TrainingConfig, base: LoadedModel) -> None:
    # the language model's own config in a vision-language encoder (Qwen-Image's Qwen2.5-VL), else the encoder's
    layers = base.text_encoder.config.get_text_config().num_hidden_layers
    errors, warnings = config.family_conflicts(base.family)
    if errors:
        raise ConfigError(errors)
    for warning in warnings:
        log.warning("%s", warning)
    if config.clip_skip > layers:
        raise ConfigError(
            [f"clip_skip = {config.clip_skip}: the text encoder has only {layers} layers (allowed: 1-{layers})"]
        )
    if config.resolution < base.native_resolution:
        log.info(
            "training at %dpx, below the model's native %dpx (fine for speed; the guide advises not always "
            "training at full resolution)",
            config.resolution,
            base.native_resolution,
        )
