"""Converting a LoRA file between the kohya and diffusers layouts, losslessly.

Any file generate-image loads is read (training/lora.py reads through diffusers' own loaders: kohya/A1111,
LoCon conv layers, kohya FLUX, XLabs, the diffusers/peft layouts), and its module names are matched
against the base model's. The model is built on the meta device from its configs: no weights are loaded.
A file of ours names its base model in its training config; for one made elsewhere, `model_name` does.

Targets: "kohya", "diffusers", and "comfyui". ComfyUI loads kohya-layout files (`lora_unet_*` /
`lora_te_*` keys with `.alpha`, which A1111/Forge read too), so "comfyui" writes the kohya layout;
for FLUX it writes the diffusers layout with `.alpha` tensors, which ComfyUI maps onto its FLUX
model (kohya's FLUX layout, with BFL's fused projections, is not written).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal, get_args

from safetensors import safe_open

from training.config import OutputFormat
from training.export import write_lora_file
from training.families import ModelFamily, folder_family, lora_family
from training.lora import LoraFileError, LoraWeights, read_lora_file
from training.models.source import ModelNotFoundError, resolve_model
from training.request_child import serve_request
from training.run_files import RUN_KEY, trained_base_model
from training.workspace import runs_dir

LoraFormat = Literal["kohya", "diffusers", "comfyui"]


def file_layout(output_format: str, family: ModelFamily | None = None) -> OutputFormat:
    """The layout written for a target and the LoRA's family (None: the target is only checked):
    ComfyUI reads kohya files, so "comfyui" is the kohya layout, except for a family that has its own
    (FLUX: the diffusers layout with alphas)."""
    if output_format not in get_args(LoraFormat):
        raise LoraFileError(f"unknown LoRA format {output_format!r}; use one of {', '.join(get_args(LoraFormat))}")
    if output_format == "kohya" and family is not None and family.kohya_layout_refusal:
        raise LoraFileError(family.kohya_layout_refusal)
    if output_format == "comfyui":
        return "kohya" if family is None else family.comfyui_layout
    return output_format


def convert_lora_file(
    source: Path,
    target: Path,
    output_format: LoraFormat,
    *,
    model_folder: Path | None = None,
    model_name: str | None = None,
) -> Path:
    """Write `source` again as `output_format` at `target`. The base model is `model_folder`, else
    `model_name` (an id, folder or built-in name), else the one named in the file's own training config."""
    file_layout(output_format)  # an unknown format is refused before anything is read
    metadata = lora_metadata(source)
    models = empty_models(base_model_folder(source, metadata, model_folder, model_name))
    weights = read_lora_file(source, models)
    family = lora_family(models)
    layout = file_layout(output_format, family)
    return write_lora_weights(target, weights, output_format=layout, family=family, metadata=metadata, source=source)


def lora_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a .safetensors file (empty when it has none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises several types for unreadable files
        raise LoraFileError(f"{path} is not a readable .safetensors LoRA file: {exc}") from None


def recorded_training_config(path: Path | str, metadata: dict[str, str]) -> dict:
    """The training config a file of ours records in its metadata ({} for other files)."""
    try:
        config = json.loads(metadata.get("training_config", "{}"))
    except ValueError:
        raise LoraFileError(f"{path}: its training_config metadata is not JSON") from None
    if not isinstance(config, dict):
        raise LoraFileError(f"{path}: its training_config metadata is not a JSON object")
    return config


def base_model_folder(
    source: Path, metadata: dict[str, str], model_folder: Path | None = None, model_name: str | None = None
) -> Path:
    """The diffusers folder that gives the architecture of `source`: `model_folder` when given, else
    `model_name`'s, else the base model named in the file's training config (for a single-file model,
    its config folder)."""
    if model_folder is not None:
        return Path(model_folder)
    training = recorded_training_config(source, metadata)
    if model_name:
        training = {"model_name": model_name}
    elif "model_name" in training:  # a local model is recorded by its folder's name only: its run's config has the path
        training["model_name"] = trained_base_model(training["model_name"], metadata.get(RUN_KEY), runs_dir())
    if "model_name" not in training:
        raise LoraFileError(
            f"{source.name} does not say which base model it is for (a LoRA made elsewhere records no training "
            "config of ours): give model_name, the base model it was trained for (an id, a diffusers folder or "
            "builtin:...)"
        )
    found = resolve_model(training["model_name"], training.get("base_model_config"))
    folder = found.config_folder if found.kind == "single_file" else found.path
    if folder is None:
        raise LoraFileError(f"the base model of {source} is a single file without base_model_config")
    return folder


def write_lora_weights(
    target: Path,
    weights: dict[str, LoraWeights],
    *,
    output_format: OutputFormat,
    family: ModelFamily,
    metadata: dict[str, str],
    source: str | Path,
) -> Path:
    """Write {'unet.<module>': LoraWeights} of one rank and alpha, of a model of `family`, as
    `output_format` at `target`; the training config in `metadata`, if any, is updated to the new
    format. `source` names the input(s) in errors."""
    if not weights:
        raise LoraFileError(f"{source} holds no LoRA weights")
    ranks = {w.down.shape[0] for w in weights.values()}
    alphas = {w.alpha for w in weights.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise LoraFileError(
            f"{source} mixes ranks {sorted(ranks)} or alphas {sorted(alphas)}; only uniform LoRAs convert"
        )
    rank, alpha = ranks.pop(), alphas.pop()

    state, targets = {}, {}
    for name, w in weights.items():
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = w.down, w.up
        prefix, module = name.split(".", 1)
        targets.setdefault(prefix, []).append(module)
    adapter_configs = {
        prefix: {"r": rank, "lora_alpha": alpha, "target_modules": sorted(modules)}
        for prefix, modules in targets.items()
    }
    metadata = dict(metadata)
    training = recorded_training_config(source, metadata)
    if training:
        metadata["training_config"] = json.dumps({**training, "output_format": output_format}, sort_keys=True)
    return write_lora_file(
        target,
        state,
        alpha=alpha,
        output_format=output_format,
        metadata=metadata,
        adapter_configs=adapter_configs,
        family=family,
    )


def empty_models(folder: Path) -> dict:
    """The models a LoRA of a diffusers folder may adapt, by prefix ({unet, text_encoder[, text_encoder_2]},
    FLUX's {transformer, text_encoder}, ...: its family's meta_lora_models), as module trees without weights."""
    try:
        return folder_family(folder).meta_lora_models(folder)
    except (OSError, ValueError, TypeError) as exc:  # a missing config; a transformer of a family not known here
        raise ModelNotFoundError(
            f"{folder} is not a diffusers model folder of a family this trainer knows (SD 1.x/2.x, SDXL, FLUX, SD 3.5, "
            f"Chroma, Qwen-Image, Z-Image), with unet/ and text_encoder/ or a transformer/: {exc}"
        ) from None


def main() -> int:
    """`python -m training.convert`: convert_lora_file for the server, which does not import torch
    (training/request_child.py): {source, target, output_format, model_name} in, {path} out."""

    def convert(source: str, target: str, output_format: LoraFormat, model_name: str | None = None) -> dict:
        return {"path": str(convert_lora_file(Path(source), Path(target), output_format, model_name=model_name))}

    return serve_request(convert, (LoraFileError, ModelNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
