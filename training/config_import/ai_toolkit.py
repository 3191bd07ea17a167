"""ai-toolkit (ostris) YAML: `job: extension`, `config: {name, process: [...]}`; the first process of type
sd_trainer or ui_trainer is imported (its network, save, datasets, train, model and sample sections and its
trigger_word). `[trigger]` in its captions and prompts works as in ai-toolkit (training/data/captions.py)."""

from __future__ import annotations

from typing import Any

from training.config_import.result import NO_EQUIVALENT, NOT_SUPPORTED, ConfigImportError, Draft, ImportResult

FORMAT = "ai-toolkit"
TRAINERS = ("sd_trainer", "ui_trainer")

# section -> {ai-toolkit key: our option}, same meaning and units.
_SAME = {
    "network": {"linear": "rank", "rank": "rank", "linear_alpha": "alpha", "alpha": "alpha", "dropout": "dropout"},
    "save": {"save_every": "save_every", "max_step_saves_to_keep": "keep_last_n_checkpoints"},
    "dataset": {
        "folder_path": "dataset_path",
        "caption_dropout_rate": "caption_dropout_rate",
        "shuffle_tokens": "shuffle_captions",
        "keep_tokens": "keep_tokens",
        "cache_latents": "cache_latents",
        "cache_latents_to_disk": "cache_latents_to_disk",
        "flip_x": "flip_aug",
        "default_caption": "instance_prompt",
        "buckets": "enable_bucketing",
    },
    "train": {
        "batch_size": "batch_size",
        "steps": "steps",
        "gradient_accumulation_steps": "gradient_accumulation_steps",
        "gradient_accumulation": "gradient_accumulation_steps",
        "unet_lr": "learning_rate",
        "text_encoder_lr": "text_encoder_lr",
        "max_grad_norm": "max_grad_norm",
        "min_snr_gamma": "min_snr_gamma",
        "noise_offset": "noise_offset",
        "gradient_checkpointing": "gradient_checkpointing",
        "train_text_encoder": "train_text_encoder",
        "disable_sampling": "disable_sampling",
    },
    "model": {"name_or_path": "model_name", "low_vram": "low_vram"},
    "sample": {
        "sample_every": "sample_every",
        "prompts": "test_prompts",
        "guidance_scale": "sample_guidance_scale",
        "sample_steps": "sample_steps",
    },
}
_DTYPES = {"fp32": "no", "float32": "no", "fp16": "fp16", "float16": "fp16", "bf16": "bf16", "bfloat16": "bf16"}
# ai-toolkit's train.timestep_type -> our timestep_sampling (sigmoid is a logit-normal draw).
_TIMESTEPS = {"linear": "uniform", "sigmoid": "logit_normal", "shift": "shift", "flux_shift": "shift"}
# A single-file model's family, from ai-toolkit's flags (a folder or hub id says it by itself).
_FAMILY_FLAGS = {"is_flux": "flux", "is_xl": "sdxl", "is_v2": "sd2"}
_ARCHES = {"flux": "flux", "flex1": "flux", "flex2": "flux", "sdxl": "sdxl", "sd1": "sd1", "sd15": "sd1"}
_REASONS = {
    "training_folder": "runs are written to the workspace's runs/",
    "device": "the trainer picks CUDA, an Apple GPU or the CPU by itself (LORA_TRAIN_DEVICE overrides)",
    "save.dtype": "the LoRA is saved as it trains, in fp32",
    "train.noise_scheduler": "the model family sets the objective (flow matching for FLUX)",
    "sample.sampler": "samples use the model's own scheduler",
    "sample.width": "samples are rendered at resolution",
    "sample.height": "samples are rendered at resolution",
    "train.ema_config": "no EMA of the LoRA weights",
    "train.optimizer_params": "the optimizer runs with its own defaults",
    "sample.seed": "samples are drawn with the run's seed, which also sets the LoRA's start and the data order",
    "network.conv": "conv layers get no LoRA (a plain LoRA on attention and MLP layers)",
    "network.conv_alpha": "conv layers get no LoRA",
}


def to_config(data: dict[str, Any], name: str) -> ImportResult:
    draft = Draft()
    process = _trainer_process(draft, data)
    for key, value in process.items():
        if key == "trigger_word":
            draft.set("trigger_word", value, key)
        elif key == "datasets":
            _map_datasets(draft, value)
        elif isinstance(value, dict) and key in _SAME:
            for inner, inner_value in value.items():
                _map_key(draft, key, inner, inner_value)
        elif key != "type" and value not in (None, "", [], {}, False):
            draft.skip(key, NO_EQUIVALENT, _REASONS.get(key, ""))
    _map_family(draft, process.get("model") or {})
    if "dataset_path" not in draft.values:
        raise ConfigImportError(
            "the process has no datasets[].folder_path: add the image folder, or import and set dataset_path"
        )
    return draft.finish(name, FORMAT)


def _trainer_process(draft: Draft, data: dict[str, Any]) -> dict[str, Any]:
    """config.process[0], a LoRA trainer; the others listed; config.name and meta as the keys they are."""
    config = data.get("config")
    processes = config.get("process") if isinstance(config, dict) else None
    if not isinstance(processes, list) or not processes or not isinstance(processes[0], dict):
        raise ConfigImportError("an ai-toolkit config holds config.process: a list with one sd_trainer process")
    if processes[0].get("type") not in TRAINERS:
        raise ConfigImportError(
            f"config.process[0] is of type {processes[0].get('type')!r}: only LoRA training ({', '.join(TRAINERS)}) "
            "is imported"
        )
    for index in range(1, len(processes)):
        draft.skip(f"config.process[{index}]", NOT_SUPPORTED, "several processes: the first is used")
    if config.get("name"):
        draft.skip("config.name", NO_EQUIVALENT, "the imported config's own name names the LoRA")
    if data.get("meta"):
        draft.skip("meta", NO_EQUIVALENT, "the LoRA's metadata is written by the trainer")
    return processes[0]


def _map_key(draft: Draft, section: str, key: str, value: Any) -> None:
    label = f"{section}.{key}"
    if key in _SAME[section]:
        draft.set(_SAME[section][key], value, label)
    elif label == "train.lr":  # the UNet's own rate, unet_lr, wins wherever it stands in the file
        if draft.sources.get("learning_rate") != "train.unet_lr":
            draft.set("learning_rate", value, label)
    elif label == "train.optimizer":
        draft.choice("optimizer", value, label)
    elif label == "train.lr_scheduler":
        draft.choice("lr_scheduler", value, label)
    elif label == "train.dtype":
        draft.translate("mixed_precision", _DTYPES, value, label)
    elif label == "train.timestep_type":
        draft.translate("timestep_sampling", _TIMESTEPS, value, label)
    elif label == "model.quantize":
        draft.set("quantize_base", "8bit" if value else "none", label)
    elif label == "network.type":
        if str(value).lower() != "lora":
            draft.skip(label, NOT_SUPPORTED, f"{value!r}: a plain LoRA is trained (no LoCon or LoKr)")
    elif label == "train.train_unet":
        if not value:
            draft.skip(label, NOT_SUPPORTED, "false: the UNet/transformer always gets the LoRA")
    elif key in _FAMILY_FLAGS or label == "model.arch":
        pass  # read by _map_family
    elif value not in (None, "", [], {}, False, 0):  # an option left off or at zero loses nothing
        draft.skip(label, NO_EQUIVALENT, _REASONS.get(label, ""))


def _map_datasets(draft: Draft, datasets: Any) -> None:
    """The first dataset that is not a regularization set trains; resolution lists train at the largest."""
    if not isinstance(datasets, list) or not datasets:
        return
    used = next((i for i, d in enumerate(datasets) if isinstance(d, dict) and not d.get("is_reg")), None)
    for index, dataset in enumerate(datasets):
        if index == used:
            continue
        reason = (
            "a regularization set: give its folder as class_data_dir with class_prompt and prior_preservation"
            if isinstance(dataset, dict) and dataset.get("is_reg")
            else "several datasets: the first is used"
        )
        draft.skip(f"datasets[{index}]", NOT_SUPPORTED, reason)
    if used is None:
        return
    for key, value in datasets[used].items():
        label = f"datasets[{used}].{key}"
        if key == "resolution":
            sides = value if isinstance(value, list) else [value]
            draft.set("resolution", max(sides), label)
            if len(sides) > 1:
                draft.skip(label, NOT_SUPPORTED, f"several resolutions {sides}: trained at the largest, {max(sides)}")
        elif key == "caption_ext":
            if str(value).lstrip(".") != "txt":
                draft.skip(label, NOT_SUPPORTED, "captions are read from .txt files")
        elif key == "random_crop":
            if value:
                draft.set("crop", "random", label)
        elif key == "num_repeats":
            if value != 1:
                draft.skip(label, NO_EQUIVALENT, "repeats come from the folder's name, 'N_name' repeats N times")
        elif key in _SAME["dataset"]:
            draft.set(_SAME["dataset"][key], value, label)
        elif key != "is_reg" and value not in (None, "", [], {}, False, 0):
            draft.skip(label, NO_EQUIVALENT)


def _map_family(draft: Draft, model: dict[str, Any]) -> None:
    """model_family for a single-file model, which its file alone does not say."""
    if not str(model.get("name_or_path", "")).endswith((".safetensors", ".ckpt")):
        return
    family = _ARCHES.get(str(model.get("arch")))
    flag = next((key for key in _FAMILY_FLAGS if model.get(key)), None)
    if family:
        draft.set("model_family", family, "model.arch")
    elif flag:
        draft.set("model_family", _FAMILY_FLAGS[flag], f"model.{flag}")
