"""kohya sd-scripts configs: train_network.py's (and flux_train_network.py's) arguments as a `--config_file`
TOML, whose sections kohya flattens ([model_arguments], [training_arguments], ...), or as the kohya_ss GUI's
JSON; and the `--dataset_config` TOML ([general], [[datasets]], [[datasets.subsets]]), read from the file the
`dataset_config` key names, given separately, or written into the same file.

A dataset TOML's values win over the arguments', as in kohya (it ignores train_data_dir and the caption
options once a dataset config is given).
"""

from __future__ import annotations

import json
import math
import tomllib
from typing import Any

from training.config_import.result import (
    NO_EQUIVALENT,
    NOT_SUPPORTED,
    ConfigImportError,
    Draft,
    FileReader,
    ImportResult,
)

FORMAT = "kohya"
# Keys only kohya configs have: how detection tells one from an ai-toolkit YAML.
MARKERS = ("pretrained_model_name_or_path", "network_module", "train_data_dir", "dataset_config", "datasets")

# kohya argument -> our option, same meaning and units.
_SAME = {
    "pretrained_model_name_or_path": "model_name",
    "train_data_dir": "dataset_path",
    "image_dir": "dataset_path",
    "class_tokens": "instance_prompt",  # kohya's caption for images without a caption file
    "enable_bucket": "enable_bucketing",
    "shuffle_caption": "shuffle_captions",
    "keep_tokens": "keep_tokens",
    "flip_aug": "flip_aug",
    "caption_dropout_rate": "caption_dropout_rate",
    "cache_latents": "cache_latents",
    "cache_latents_to_disk": "cache_latents_to_disk",
    "cache_text_encoder_outputs_to_disk": "cache_text_encoder_outputs_to_disk",
    "train_batch_size": "batch_size",
    "batch_size": "batch_size",
    "max_train_steps": "steps",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "text_encoder_lr": "text_encoder_lr",
    "lr_scheduler_num_cycles": "lr_scheduler_num_cycles",
    "max_grad_norm": "max_grad_norm",
    "gradient_checkpointing": "gradient_checkpointing",
    "seed": "seed",
    "noise_offset": "noise_offset",
    "min_snr_gamma": "min_snr_gamma",
    "network_dim": "rank",
    "network_alpha": "alpha",
    "network_dropout": "dropout",
    "clip_skip": "clip_skip",
    "max_token_length": "max_token_length",
    "prior_loss_weight": "prior_loss_weight",
    "save_every_n_steps": "save_every",
    "sample_every_n_steps": "sample_every",
    "network_weights": "resume_from",
    "discrete_flow_shift": "timestep_shift",
}
_CHOICES = {"optimizer_type": "optimizer", "optimizer": "optimizer", "lr_scheduler": "lr_scheduler",
            "mixed_precision": "mixed_precision"}  # fmt: skip
# kohya's timestep_sampling -> ours: sigma and uniform draw uniformly, sigmoid is a logit-normal draw, and
# flux_shift is the shift by resolution that our shift uses when timestep_shift is not set.
_TIMESTEP_SAMPLING = {"uniform": "uniform", "sigma": "uniform", "sigmoid": "logit_normal", "shift": "shift",
                      "flux_shift": "shift"}  # fmt: skip
# Why a kohya key has no equivalent, where there is more to say than that.
_REASONS = {
    **dict.fromkeys(
        ("output_dir", "logging_dir", "log_prefix"), "runs are written to the workspace's runs/"
    ),
    **dict.fromkeys(
        ("max_train_epochs", "epoch", "save_every_n_epochs", "sample_every_n_epochs", "save_last_n_epochs"),
        "training is counted in steps: set steps, save_every and sample_every",
    ),
    **dict.fromkeys(("xformers", "sdpa", "mem_eff_attn"), "attention is always torch's scaled_dot_product_attention"),
    **dict.fromkeys(("save_precision", "full_fp16", "full_bf16"), "the LoRA trains and is saved in fp32"),
    **dict.fromkeys(
        ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale"), "buckets follow resolution"
    ),
    **dict.fromkeys(
        ("ae", "clip_l", "t5xxl", "vae"),
        "the model's parts are read from model_name: give a diffusers folder or hub id",
    ),
    "reg_data_dir": "class images need their class prompt: set class_data_dir, class_prompt and prior_preservation",
    "cache_text_encoder_outputs": "captions are encoded once by themselves while the text encoder is frozen",
    "save_state": "every checkpoint is resumable",
    "sample_sampler": "samples use the model's own scheduler",
    "optimizer_args": "the optimizer runs with its own defaults",
    "metadata_file": "captions are .txt files beside the images (kohya's fine-tuning metadata is not read)",
}
_SINGLE_FILE = (".safetensors", ".ckpt")
# kohya's log_with (one of these) as ours, a list; its logging_dir has no equivalent: the run's own folders.
_LOG_WITH = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}


def parse(text: str) -> dict[str, Any]:
    """The config as a mapping: TOML (sd-scripts) or JSON (kohya_ss)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as toml_error:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigImportError(f"not valid TOML ({toml_error}) nor JSON: fix the file or give its text as it is")
    if not isinstance(data, dict):
        raise ConfigImportError("a kohya JSON config must be an object of argument: value")
    return data


def to_config(data: dict[str, Any], name: str, read_file: FileReader | None, dataset_text: str | None) -> ImportResult:
    draft = Draft()
    args = _flattened(data)
    pasted = {key: args.pop(key) for key in ("general", "datasets") if key in args}
    flux = args.get("network_module") == "networks.lora_flux" or "t5xxl" in args or "ae" in args
    for key, value in args.items():
        _map_argument(draft, key, value, args, read_file)
    _map_text_encoder(draft, args, flux)
    _map_family(draft, args, flux)
    dataset = pasted or _dataset_document(draft, args.get("dataset_config"), read_file, dataset_text)
    if dataset:
        _map_dataset(draft, dataset, read_file)
    if "dataset_path" not in draft.values:
        raise ConfigImportError(
            "the config names no images: kohya's train_data_dir or the dataset TOML's image_dir. Give the dataset "
            "TOML too (its [[datasets]] in the same text), or import the config and set dataset_path afterwards"
        )
    return draft.finish(name, FORMAT)


def _flattened(data: dict[str, Any]) -> dict[str, Any]:
    """kohya's --config_file reading: the keys of every [section] at the top level (the dataset TOML's
    [general] and [[datasets]] stay as they are)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "general":
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _map_argument(draft: Draft, key: str, value: Any, args: dict[str, Any], read_file: FileReader | None) -> None:
    """One kohya argument (or dataset TOML key), set as our option or listed with the reason."""
    if key in _SAME:
        draft.set(_SAME[key], value, key)
    elif key in _CHOICES:
        draft.choice(_CHOICES[key], value, key)
    elif key in ("learning_rate", "unet_lr"):
        if key == "unet_lr" or "unet_lr" not in args:  # kohya's unet_lr wins over learning_rate
            draft.set("learning_rate", value, key)
    elif key in ("resolution", "max_resolution"):
        _map_resolution(draft, key, value)
    elif key == "lr_warmup_steps":
        _map_warmup(draft, value, args.get("max_train_steps"))
    elif key == "random_crop":
        if value:
            draft.set("crop", "random", key)
    elif key == "caption_extension":
        if str(value).lstrip(".") != "txt":
            draft.skip(key, NOT_SUPPORTED, "captions are read from .txt files")
    elif key == "log_with":
        draft.translate("log_with", _LOG_WITH, value, key)
    elif key == "timestep_sampling":
        draft.translate("timestep_sampling", _TIMESTEP_SAMPLING, value, key)
    elif key == "fp8_base":
        if value:
            draft.set("quantize_base", "8bit", key)
            draft.skip(key, NOT_SUPPORTED, "fp8 weights: the frozen transformer is loaded in 8-bit integers instead")
    elif key == "network_module":
        if value not in ("networks.lora", "networks.lora_flux"):
            draft.skip(key, NOT_SUPPORTED, f"{value!r}: a plain LoRA is trained (no LyCORIS, LoCon or LoKr)")
    elif key == "network_args":
        for entry in value if isinstance(value, list) else [value]:
            draft.skip(f"network_args.{str(entry).split('=')[0].strip()}", NO_EQUIVALENT, f"{entry!r}")
    elif key == "sample_prompts":
        _map_sample_prompts(draft, str(value), read_file)
    elif key == "output_name":
        draft.skip(key, NO_EQUIVALENT, "the imported config's own name names the LoRA")
    elif key == "save_model_as":
        if value != "safetensors":
            draft.skip(key, NOT_SUPPORTED, "LoRAs are written as .safetensors")
    elif key in ("dataset_config", "network_train_unet_only", "v2", "is_reg", "subsets"):
        pass  # read with the rest: the dataset TOML, the text encoder, the family, the dataset's subsets
    elif key == "num_repeats":
        if value != 1:
            draft.skip(key, NO_EQUIVALENT, "repeats come from the folder's name, 'N_name' repeats N times")
    elif value not in (None, "", [], {}, False, 0):  # an option left off or at zero loses nothing
        draft.skip(key, NO_EQUIVALENT, _REASONS.get(key, ""))


def _map_resolution(draft: Draft, key: str, value: Any) -> None:
    """kohya's "W,H" (or one number, or [W, H]) as our square side: a non-square size keeps its pixel count."""
    try:
        parts = value if isinstance(value, list) else str(value).split(",")
        sides = [int(str(part).strip()) for part in parts]
    except ValueError:
        draft.skip(key, NOT_SUPPORTED, f"{value!r} is not a size in pixels")
        return
    side = sides[0] if len(set(sides)) == 1 else round(math.sqrt(sides[0] * sides[-1]) / 8) * 8
    draft.set("resolution", side, key)
    if len(set(sides)) > 1:
        draft.skip(key, NOT_SUPPORTED, f"{value!r} is not square: trained at {side}x{side}, the same pixel count")


def _map_warmup(draft: Draft, value: Any, steps: Any) -> None:
    """kohya's lr_warmup_steps is a step count, or below 1 a share of the steps."""
    if isinstance(value, float) and value < 1:
        if isinstance(steps, int):
            draft.set("lr_warmup_steps", round(value * steps), "lr_warmup_steps")
        else:
            draft.skip("lr_warmup_steps", NOT_SUPPORTED, f"a share ({value}) of a step count the config does not give")
    else:
        draft.set("lr_warmup_steps", value, "lr_warmup_steps")


def _map_sample_prompts(draft: Draft, path: str, read_file: FileReader | None) -> None:
    """kohya's prompt file: one prompt a line, options after ' --' (--n negative, --w width, ...), '#' comments."""
    if not path.endswith(".txt") or read_file is None:
        draft.skip("sample_prompts", NOT_SUPPORTED, f"{path!r}: only a .txt prompt file beside the config is read")
        return
    try:
        lines = read_file(path).splitlines()
    except OSError as exc:
        draft.skip("sample_prompts", NOT_SUPPORTED, f"cannot read {path!r}: {exc}")
        return
    prompts = [line.split(" --")[0].strip() for line in lines if line.strip() and not line.startswith("#")]
    if any(" --" in line for line in lines):
        draft.skip("sample_prompts", NOT_SUPPORTED, "per-prompt options (--n, --w, --s, ...) are not used")
    if prompts:
        draft.set("test_prompts", prompts, "sample_prompts")


def _map_text_encoder(draft: Draft, args: dict[str, Any], flux: bool) -> None:
    """kohya trains a LoRA on the text encoder too unless network_train_unet_only (or its learning rate is 0)."""
    unet_only = bool(args.get("network_train_unet_only")) or args.get("text_encoder_lr") == 0
    if unet_only:
        draft.values.pop("text_encoder_lr", None)
    elif flux:
        draft.skip("network_train_unet_only", NOT_SUPPORTED, "false: FLUX's text encoders get no LoRA here")
    else:
        draft.set("train_text_encoder", True, "network_train_unet_only")


def _map_family(draft: Draft, args: dict[str, Any], flux: bool) -> None:
    """The family of a single-file model, which its file alone does not say (a folder or hub id says it)."""
    model = str(args.get("pretrained_model_name_or_path", ""))
    if model.endswith(_SINGLE_FILE) and (flux or args.get("v2")):
        draft.set("model_family", "flux" if flux else "sd2", "network_module" if flux else "v2")


def _dataset_document(
    draft: Draft, path: Any, read_file: FileReader | None, dataset_text: str | None
) -> dict[str, Any] | None:
    """The dataset TOML: given separately, else the file `dataset_config` names when it can be read."""
    if dataset_text is None and path:
        if read_file is None:
            draft.skip("dataset_config", NOT_SUPPORTED, f"{path!r} is not read here: give its text too")
            return None
        try:
            dataset_text = read_file(str(path))
        except OSError as exc:
            draft.skip("dataset_config", NOT_SUPPORTED, f"cannot read {path!r}: {exc}")
            return None
    if dataset_text is None:
        return None
    try:
        return tomllib.loads(dataset_text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigImportError(f"the dataset config is not valid TOML: {exc}") from None


def _map_dataset(draft: Draft, document: dict[str, Any], read_file: FileReader | None) -> None:
    """The first dataset's first image folder trains; its first regularization folder (is_reg) gives the
    class images of prior preservation. [general] < [[datasets]] < [[datasets.subsets]], as kohya inherits."""
    datasets = document.get("datasets") or []
    for index in range(1, len(datasets)):
        draft.skip(f"datasets[{index}]", NOT_SUPPORTED, "several datasets: the first is used")
    if not datasets:
        draft.skip("dataset_config", NOT_SUPPORTED, "it has no [[datasets]]")
        return
    first = datasets[0]
    shared = {**document.get("general", {}), **{k: v for k, v in first.items() if k != "subsets"}}
    subsets = list(enumerate(first.get("subsets") or []))
    images = [(i, s) for i, s in subsets if not s.get("is_reg")]
    classes = [(i, s) for i, s in subsets if s.get("is_reg")]
    if images:
        for key, value in {**shared, **images[0][1]}.items():
            _map_argument(draft, key, value, {}, read_file)
    for index, _ in images[1:]:
        draft.skip(
            f"datasets[0].subsets[{index}]",
            NOT_SUPPORTED,
            "several image folders: the first is used; make them subfolders of one dataset folder ('N_name' "
            "repeats N times)",
        )
    if classes:
        index, subset = classes[0]
        draft.set("class_data_dir", subset.get("image_dir"), f"datasets[0].subsets[{index}].image_dir")
        draft.set("prior_preservation", True, f"datasets[0].subsets[{index}].is_reg")
        if subset.get("class_tokens"):
            draft.set("class_prompt", subset["class_tokens"], f"datasets[0].subsets[{index}].class_tokens")
    for index, _ in classes[1:]:
        draft.skip(f"datasets[0].subsets[{index}]", NOT_SUPPORTED, "several class image folders: the first is used")
