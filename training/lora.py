"""The LoRA adapters: attaching them with peft, reading their weights, and starting from a
previous LoRA file (also into a larger rank, for the guide's progressive training).

Weights are addressed as `<prefix>.<module path>`, where the prefix names the model (`unet`,
`text_encoder`, `text_encoder_2`, or FLUX's `transformer`) and the module path is the one in the
loaded model (peft's own naming). The functions take the models as {prefix: model}, as
LoadedModel.lora_models gives them. Which denoiser layers are adapted is the family's
(training/families/: `lora_target_modules`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from training.config import ConfigError
from training.families import lora_family

TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# SDXL's two text encoders are kohya's te1 and te2.
SDXL_KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
ALL_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


class LoraFileError(ValueError):
    """A LoRA file that cannot be used to start from; the message says why."""


def attach_lora(
    models: dict[str, torch.nn.Module],
    *,
    rank: int,
    alpha: float,
    dropout: float,
    seed: int,
    train_text_encoder: bool,
    target_modules: list[str] | None = None,
) -> None:
    """Add trainable LoRA adapters (A gaussian, B zero: the model starts unchanged) to the denoiser
    (`target_modules`, default: its family's) and, with train_text_encoder, to every text encoder
    in `models` (SDXL has two)."""
    torch.manual_seed(seed)  # the A matrices' initial values
    family = lora_family(models)
    for prefix, model in models.items():
        if prefix.startswith("text_encoder"):
            if train_text_encoder:
                model.add_adapter(_lora_config(rank, alpha, dropout, TEXT_ENCODER_TARGET_MODULES))
            continue
        targets = target_modules or list(family.lora_target_modules)
        if target_modules:
            _check_targets(model, prefix, target_modules)
        model.add_adapter(_lora_config(rank, alpha, dropout, targets, family.lora_excluded_modules))


def _check_targets(model: torch.nn.Module, prefix: str, targets: list[str]) -> None:
    """Each target must name linear layers of the model (matched as peft matches: a module-name suffix):
    kohya, ComfyUI and this trainer's own resume read linear LoRAs only."""
    problems = []
    for target in targets:
        matched = [m for name, m in model.named_modules() if name == target or name.endswith(f".{target}")]
        kinds = sorted({type(m).__name__ for m in matched if not isinstance(m, torch.nn.Linear)})
        if not matched:
            problems.append(f"target_modules: {target!r} names no layer of the {prefix}")
        elif kinds:
            problems.append(f"target_modules: {target!r} names {', '.join(kinds)} layers, not linear ones")
    if problems:
        examples = sorted({_short_name(name) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(problems + [f"linear layer names of the {prefix}: {', '.join(examples[:30])}"])


def _short_name(module_name: str) -> str:
    """The suffix that names a kind of layer: `to_q`, and `to_out.0` rather than `0`."""
    parts = module_name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _lora_config(
    rank: int, alpha: float, dropout: float, targets: list[str], excluded: str | None = None
) -> LoraConfig:
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
        exclude_modules=excluded,
    )


def lora_components(models: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """The models that carry adapters, by their prefix."""
    return {prefix: model for prefix, model in models.items() if getattr(model, "peft_config", None)}


def lora_state_dict(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """peft-named LoRA weights of every component: `unet.<module>.lora_A.weight`, ..."""
    state = {}
    for prefix, model in lora_components(models).items():
        state.update({f"{prefix}.{key}": value for key, value in get_peft_model_state_dict(model).items()})
    return state


def canonical_module_name(prefix: str, module_name: str) -> str:
    """The module path other tools use. kohya, ComfyUI and A1111 name CLIP text-encoder modules
    `text_model.encoder.layers.N...` (transformers < 5 and the original checkpoints); transformers
    5 dropped the `text_model` wrapper, so it is put back for files we write."""
    if prefix.startswith("text_encoder") and not module_name.startswith("text_model."):
        return "text_model." + module_name
    return module_name


@dataclass
class LoraWeights:
    down: torch.Tensor  # A: (rank, in_features)
    up: torch.Tensor  # B: (out_features, rank)
    alpha: float


def read_lora_file(path: Path, models: dict[str, torch.nn.Module]) -> dict[str, LoraWeights]:
    """Read a kohya or diffusers/peft LoRA file into {'unet.<module>': LoraWeights}.

    Keys are matched against the modules of the loaded models, so a file made for another
    architecture is refused instead of half-applied.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            metadata = f.metadata() or {}
    except Exception as exc:
        raise LoraFileError(f"{path} is not a readable .safetensors LoRA file: {exc}") from None
    if any(key.startswith(ALL_KOHYA_PREFIXES) for key in tensors):
        if "transformer" in models:
            if any("double_blocks" in key or "single_blocks" in key for key in tensors):
                raise LoraFileError(
                    f"{path} is a kohya-layout FLUX LoRA (lora_unet_double_blocks_*, fused projections); this "
                    "trainer reads FLUX LoRAs in the diffusers layout (transformer.*.lora_A.weight): convert it "
                    "with diffusers (FluxPipeline.lora_state_dict) first"
                )
            raise LoraFileError(f"{path} is a kohya LoRA of a UNet model (SD 1.x/2.x or SDXL), not of this FLUX model")
        return _read_kohya(path, tensors, models)
    if any(".lora_A." in key for key in tensors):
        return _read_peft(path, tensors, metadata, models)
    raise LoraFileError(f"{path} is neither a kohya (lora_unet_*) nor a diffusers/peft (*.lora_A.*) LoRA file")


def _module_names(model: torch.nn.Module, prefix: str) -> set[str]:
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | LoraLayer):
            names.add(name)
    return {f"{prefix}.{name}" for name in names}


def _read_kohya(path: Path, tensors: dict, models: dict) -> dict[str, LoraWeights]:
    prefixes = SDXL_KOHYA_PREFIXES if "text_encoder_2" in models else KOHYA_PREFIXES
    by_kohya_name = {}
    for prefix, model in models.items():
        for full in _module_names(model, prefix):
            module = full.split(".", 1)[1]
            kohya = prefixes[prefix] + canonical_module_name(prefix, module).replace(".", "_")
            by_kohya_name[kohya] = full
    weights = {}
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key.removesuffix(".lora_down.weight")
        if stem not in by_kohya_name:
            raise LoraFileError(f"{path}: {stem} names no module of this base model (another architecture?)")
        down, up = tensors[key], tensors.get(f"{stem}.lora_up.weight")
        if up is None or down.ndim != 2:
            raise LoraFileError(f"{path}: {stem} is not a plain linear LoRA (conv/LoCon layers are not supported)")
        alpha = float(tensors[f"{stem}.alpha"]) if f"{stem}.alpha" in tensors else float(down.shape[0])
        weights[by_kohya_name[stem]] = LoraWeights(down.float(), up.float(), alpha)
    return weights


def _read_peft(path: Path, tensors: dict, metadata: dict, models: dict) -> dict[str, LoraWeights]:
    adapter_config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    known = set().union(*(_module_names(model, prefix) for prefix, model in models.items()))
    weights = {}
    for key in tensors:
        if ".lora_A." not in key:
            continue
        stem = key.split(".lora_A.")[0]
        prefix, module = stem.split(".", 1)
        if prefix not in models:
            raise LoraFileError(
                f"{path}: its keys start with {prefix!r}, and this base model's LoRA adapts only "
                f"{', '.join(models)} (written by another tool, or for another architecture); LoRAs in the diffusers "
                f"layout ({next(iter(models))}.<module>.lora_A.weight) are read"
            )
        if prefix.startswith("text_encoder") and stem not in known:
            stem = f"{prefix}.{module.removeprefix('text_model.')}"  # written canonically, loaded without the wrapper
        if stem not in known:
            raise LoraFileError(f"{path}: {stem} names no module of this base model (another architecture?)")
        down, up = tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")]
        alpha_tensor = tensors.get(key.split(".lora_A.")[0] + ".alpha")  # FLUX files carry kohya-style alphas
        if alpha_tensor is not None:
            alpha = float(alpha_tensor)
        else:
            alpha = float(adapter_config.get(f"{prefix}.lora_alpha", down.shape[0]))
        weights[stem] = LoraWeights(down.float(), up.float(), alpha)
    return weights


def load_lora_weights_into(weights: dict[str, LoraWeights], models: dict[str, torch.nn.Module]) -> list[str]:
    """Copy `weights` into the attached adapters; a smaller rank is zero-padded.

    Padding keeps the function of the old LoRA: its rows of A and columns of B are copied
    (B rescaled by old scale / new scale, scale = alpha / rank), the new columns of B are zero and
    the new rows of A keep their random init, so they start with no effect yet get gradients.
    Returns notes for the log (modules of this run that the file does not cover).
    """
    components = lora_components(models)
    layers = {
        f"{prefix}.{name}": module
        for prefix, model in components.items()
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    needs_text_encoder = sorted(k for k in weights if k.startswith("text_encoder") and k not in layers)
    if needs_text_encoder:
        raise LoraFileError(
            "the LoRA has text-encoder weights but this run does not train the text encoder: "
            "set train_text_encoder: true to keep them"
        )
    with torch.no_grad():
        for name, w in weights.items():
            if name not in layers:
                raise LoraFileError(f"the LoRA has weights for {name}, which this run does not train")
            layer = layers[name]
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            old_rank, new_rank = w.down.shape[0], a.shape[0]
            if old_rank > new_rank:
                raise LoraFileError(f"the LoRA has rank {old_rank}; set rank to {old_rank} or more to continue it")
            if w.down.shape[1] != a.shape[1] or w.up.shape[0] != b.shape[0]:
                raise LoraFileError(f"{name}: shapes differ from this base model (another architecture?)")
            rescale = (w.alpha / old_rank) / layer.scaling["default"]
            a[:old_rank] = w.down.to(a)
            b.zero_()
            b[:, :old_rank] = (w.up * rescale).to(b)
    missing = sorted(set(layers) - set(weights))
    return [f"{len(missing)} trained module(s) are not in the LoRA and start from zero"] if missing else []
