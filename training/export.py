"""Writing LoRA files that ComfyUI, A1111/Forge and diffusers load.

- kohya: `lora_unet_*` / `lora_te_*` (SDXL: `lora_te1_*` / `lora_te2_*`) keys with `.lora_down.weight`,
  `.lora_up.weight` and `.alpha` (diffusers' own PEFT -> kohya conversion, with the SD 1.x/2.x `lora_te_`
  prefix and the run's alpha, which that conversion sets to the rank).
- diffusers: peft keys (`unet.<module>.lora_A.weight`) with the adapter config (rank, alpha,
  targets) in the `lora_adapter_metadata` entry diffusers reads back.
- FLUX: the diffusers layout (`transformer.<module>.lora_A.weight` / `.lora_B.weight`) plus an
  `transformer.<module>.alpha` tensor per module, the form ComfyUI maps onto its FLUX model (it
  reads alpha only from such tensors) and diffusers' FLUX loader takes as network alphas. kohya's
  own FLUX layout names BFL's fused qkv projections and is not written.
- SD 3.5, Qwen-Image, Z-Image (`fold_alpha`): the diffusers layout with alpha / rank folded into the up
  weights, no alpha tensors and no adapter config (their diffusers loaders refuse alpha tensors, and ComfyUI
  ignores the config): it loads the same in both, and reads back with alpha = rank.

What else a file tells (the config's `metadata`): `full`, kohya's `ss_*` keys, the SAI model spec's
`modelspec.*` (as kohya's library/sai_model_spec.py writes them) and the training config as JSON;
`minimal`, rank, alpha, base-model version, trigger words and the model spec's title and architecture;
`none`, nothing, like kohya's --no_metadata. The diffusers layout keeps its adapter config in
`lora_adapter_metadata` except with `none` (diffusers reads alpha there): without it, the alpha / rank
scale is folded into the up weights, so the file loads the same everywhere. No value names a local
path: a model folder, the dataset and every other path in the config (and in peft's adapter config)
are written as their last part, since a shared file must not tell others /home/<user>/...; a hub id
stays as it is. The run folder's name (`training_run`, the job id under the server) lets this workspace's
tools find such a model's path again in the run's config.yaml (training.run_files.trained_base_model).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from safetensors.torch import save_file

from training.lora import canonical_module_name, lora_components, lora_state_dict
from training.run_files import RUN_KEY
from training.workspace import atomic_output

if TYPE_CHECKING:
    from training.config import TrainingConfig
    from training.data.dataset import DatasetIndex
    from training.families import ModelFamily
    from training.models.loading import LoadedModel


def export_lora(
    path: Path,
    base: LoadedModel,
    config: TrainingConfig,
    *,
    dataset: DatasetIndex,
    step: int,
    epoch: int,
    num_epochs: int,
    started_at: float,
    run: str | None = None,
) -> Path:
    """Write the current adapters of `base` to `path` (atomically) in `config.output_format`; `run` is the
    name of the run folder (recorded with `metadata: full`, see training.run_files.RUN_KEY)."""
    models = base.lora_models
    state = {key: value.detach().float().cpu() for key, value in lora_state_dict(models).items()}
    components = lora_components(models)
    adapter_configs = {prefix: model.peft_config["default"].to_dict() for prefix, model in components.items()}
    metadata = training_metadata(
        base, config, dataset=dataset, step=step, epoch=epoch, num_epochs=num_epochs, started_at=started_at, run=run
    )
    if config.metadata == "minimal":
        metadata = {key: metadata[key] for key in MINIMAL_KEYS if key in metadata}
    elif config.metadata == "none":
        metadata = {}
        if config.output_format == "diffusers" and not base.family_rules.alpha_tensors:
            adapter_configs = {}  # no adapter config to carry alpha: write_lora_file folds it into B
    return write_lora_file(
        path,
        state,
        alpha=config.alpha,
        output_format=config.output_format,
        metadata=metadata,
        adapter_configs=adapter_configs,
        family=base.family_rules,
    )


def write_lora_file(
    path: Path,
    state: dict[str, torch.Tensor],
    *,
    alpha: float,
    output_format: str,
    metadata: dict[str, str],
    adapter_configs: dict[str, dict],
    family: ModelFamily,
) -> Path:
    """Write peft-named LoRA weights (`unet.<module>.lora_A.weight`, ...) of a model of `family` as a
    kohya or diffusers file, atomically. `adapter_configs` holds each component's peft config (r,
    lora_alpha, ...); without them (metadata none), or for a `fold_alpha` family, a diffusers file has
    alpha / rank folded into its up weights."""
    canonical = {}
    for key, value in state.items():
        prefix, rest = key.split(".", 1)
        module, suffix = rest.rsplit(".lora_", 1)
        canonical[f"{prefix}.{canonical_module_name(prefix, module)}.lora_{suffix}"] = value.contiguous()
    metadata = dict(metadata)
    if output_format == "kohya":
        tensors = {}
        two_encoders = any(key.startswith("text_encoder_2.") for key in canonical)
        for key, value in convert_state_dict_to_kohya(canonical).items():
            if not two_encoders:
                key = key.replace("lora_te1_", "lora_te_")  # SD 1.x/2.x have one text encoder: kohya's lora_te_
            if key.endswith(".alpha"):
                value = torch.tensor(float(alpha))  # the conversion writes the rank; kohya stores alpha
            tensors[key] = value
        metadata.pop("lora_adapter_metadata", None)
    else:
        tensors = dict(canonical)
        # Alphas go with the family's denoiser (FLUX's transformer); a text-encoder-only file keeps the config.
        if family.alpha_tensors and any(key.startswith(f"{family.denoiser_prefix}.") for key in canonical):
            # diffusers refuses a file that has both alpha tensors and the adapter config, whose rank the
            # shapes already give.
            for key in canonical:
                if key.endswith(".lora_A.weight"):
                    tensors[key.removesuffix(".lora_A.weight") + ".alpha"] = torch.tensor(float(alpha))
            metadata.pop("lora_adapter_metadata", None)
        elif family.fold_alpha or not adapter_configs:
            # diffusers reads alpha = rank from a file with neither alpha tensors nor the adapter config, and so
            # does ComfyUI: the scale alpha / rank goes into B (SD 3.5, Qwen-Image, Z-Image, whose diffusers
            # loaders refuse alpha tensors; kohya's ss_network_alpha still records the run's alpha).
            for key, value in canonical.items():
                if ".lora_B." in key:
                    tensors[key] = value * (alpha / canonical[key.replace(".lora_B.", ".lora_A.")].shape[0])
            metadata.pop("lora_adapter_metadata", None)
        else:
            flat = {
                f"{prefix}.{field}": _without_paths(sorted(value) if isinstance(value, set) else value)
                for prefix, fields in adapter_configs.items()
                for field, value in fields.items()
            }
            metadata["lora_adapter_metadata"] = json.dumps(flat, sort_keys=True, default=str)

    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata or None)  # none: no __metadata__ entry at all
    return path


def training_metadata(
    base: LoadedModel,
    config: TrainingConfig,
    *,
    dataset: DatasetIndex,
    step: int,
    epoch: int,
    num_epochs: int,
    started_at: float,
    run: str | None = None,
) -> dict[str, str]:
    """kohya's ss_* keys and the SAI model spec, all strings as safetensors requires."""
    resolution = f"{config.resolution}x{config.resolution}"
    family = base.family_rules
    now = datetime.now(UTC)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": f"{config.alpha:g}",
        "ss_network_dropout": f"{config.dropout:g}",
        "ss_learning_rate": f"{config.learning_rate:g}",
        "ss_unet_lr": f"{config.learning_rate:g}",
        "ss_text_encoder_lr": f"{config.text_encoder_lr or config.learning_rate:g}"
        if config.train_text_encoder
        else "0",
        "ss_optimizer": config.optimizer,
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_max_train_steps": str(config.steps),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
        "ss_num_epochs": str(num_epochs),
        "ss_seed": str(config.seed),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_mixed_precision": config.mixed_precision,
        "ss_max_grad_norm": f"{config.max_grad_norm:g}",
        "ss_base_model_version": base.base_model_version,
        "ss_v2": str(family.sd_v2),
        "ss_sd_model_name": public_name(config.model_name),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_clip_skip": str(config.clip_skip),
        "ss_max_token_length": str(config.max_token_length),
        "ss_noise_offset": f"{config.noise_offset:g}",
        "ss_min_snr_gamma": f"{config.min_snr_gamma:g}" if config.min_snr_gamma else "None",
        "ss_caption_dropout_rate": f"{config.caption_dropout_rate:g}",
        "ss_shuffle_caption": str(config.shuffle_captions),
        "ss_keep_tokens": str(config.keep_tokens),
        "ss_flip_aug": str(config.flip_aug),
        "ss_enable_bucket": str(config.enable_bucketing),
        "ss_prior_loss_weight": f"{config.prior_loss_weight:g}",
        "ss_num_train_images": str(dataset.num_samples),
        "ss_dataset_dirs": json.dumps(
            {c.folder or ".": {"n_repeats": c.repeats, "img_count": c.num_images} for c in dataset.concepts}
        ),
        "ss_tag_frequency": json.dumps(dataset.tag_frequency()),
        "ss_output_name": config.name,
        "ss_training_started_at": f"{started_at:.0f}",
        "ss_training_finished_at": f"{now.timestamp():.0f}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.modelspec_architecture(base)}/lora",
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": config.name,
        "modelspec.resolution": resolution,
        "modelspec.date": now.strftime("%Y-%m-%dT%H:%M:%S"),
        "training_config": json.dumps(_without_paths(config.model_dump(mode="json")), sort_keys=True),
    }
    if base.prediction_type != "flow_matching":  # kohya writes none for FLUX
        meta["modelspec.prediction_type"] = "v" if base.prediction_type == "v_prediction" else "epsilon"
    if triggers := trigger_phrase(config, dataset):
        meta["modelspec.trigger_phrase"] = triggers
    if run:
        meta[RUN_KEY] = run
    return meta


def trigger_phrase(config: TrainingConfig, dataset: DatasetIndex) -> str:
    """Every trigger the run used, comma-joined as kohya's and merge's trigger phrases: the config's trigger_word,
    then each concept folder's (a multi-concept dataset's 'xyz_cat, xyz_dog'), each once, any case."""
    first_spelling: dict[str, str] = {}
    for trigger in (config.trigger_word, *(concept.trigger_word for concept in dataset.concepts)):
        if trigger:
            first_spelling.setdefault(trigger.lower(), trigger)
    return ", ".join(first_spelling.values())


# The config's `metadata: minimal`: what a user of the file needs to load and prompt it. The spec's
# version marker goes with the two modelspec keys, which readers take as the model spec only with it.
MINIMAL_KEYS = (
    "ss_network_dim",
    "ss_network_alpha",
    "ss_base_model_version",
    "modelspec.sai_model_spec",
    "modelspec.title",
    "modelspec.architecture",
    "modelspec.trigger_phrase",
)


def public_name(value: str) -> str:
    """`value` as it may leave this machine: a local path (absolute, under ~, or an existing relative
    one) as its last part; anything else (a hub id "owner/name", builtin:..., a word) unchanged."""
    path = Path(value).expanduser()
    if value.startswith("~") or path.is_absolute() or (os.sep in value and path.exists()):
        return path.name
    return value


def _without_paths(value):
    """The config's JSON form with every string put through public_name."""
    if isinstance(value, dict):
        return {key: _without_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_paths(item) for item in value]
    return public_name(value) if isinstance(value, str) else value
