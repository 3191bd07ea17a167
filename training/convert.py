"""Converting a LoRA file between the kohya and diffusers layouts, losslessly.

kohya names flatten module paths with underscores (`lora_unet_down_blocks_0_..._to_q`), which
cannot be undone by string rules alone; the names are matched against the base model's modules
instead. The model is built on the meta device from its configs: no weights are loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from training.config import OutputFormat
from training.export import write_lora_file
from training.lora import LoraFileError, read_lora_file
from training.models.loading import resolve_model


def convert_lora_file(
    source: Path, target: Path, output_format: OutputFormat, *, model_folder: Path | None = None
) -> Path:
    """Write `source` again as `output_format` at `target`. The base model is `model_folder`, else
    the one named in the file's own training config."""
    with safe_open(str(source), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    training = json.loads(metadata.get("training_config", "{}"))
    if model_folder is None:
        if "model_name" not in training:
            raise LoraFileError(f"{source} does not say which base model it is for: give the model folder")
        found = resolve_model(training["model_name"], training.get("base_model_config"))
        model_folder = found.config_folder if found.kind == "single_file" else found.path
        if model_folder is None:
            raise LoraFileError(f"the base model of {source} is a single file without base_model_config")

    unet, text_encoder = _empty_models(model_folder)
    weights = read_lora_file(source, unet, text_encoder)
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
    if training:
        metadata["training_config"] = json.dumps({**training, "output_format": output_format}, sort_keys=True)
    return write_lora_file(
        target, state, alpha=alpha, output_format=output_format, metadata=metadata, adapter_configs=adapter_configs
    )


def _empty_models(folder: Path):
    """The UNet and text encoder of a diffusers folder, as module trees without weights."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder), subfolder="unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder), subfolder="text_encoder"))
    return unet, text_encoder
