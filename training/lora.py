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
from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from safetensors import safe_open

from training.config import ConfigError
from training.families import lora_family

TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]


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
    """Each target must name linear or conv layers of the model (matched as peft matches: a module-name
    suffix): kohya's LoCon, ComfyUI and diffusers read LoRAs of both; norms and embeddings they do not."""
    problems = []
    for target in targets:
        matched = [m for name, m in model.named_modules() if name == target or name.endswith(f".{target}")]
        kinds = sorted({type(m).__name__ for m in matched if not isinstance(m, torch.nn.Linear | torch.nn.Conv2d)})
        if not matched:
            problems.append(f"target_modules: {target!r} names no layer of the {prefix}")
        elif kinds:
            problems.append(f"target_modules: {target!r} names {', '.join(kinds)} layers, not linear or conv ones")
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
    """Read any LoRA file that generate-image loads into {'unet.<module>': LoraWeights}: diffusers' own
    loader for the family (`lora_state_dict`: kohya/A1111, kohya FLUX, XLabs, LoCon conv layers, the diffusers
    and peft layouts) gives diffusers names, and those are brought to peft's module names here.

    Every module must be a layer of the models, so a file made for another architecture is refused
    instead of half-applied; the message names the file and shows its keys. So is a file with tensors
    the tools that read it here cannot carry (DoRA magnitudes, LoRA biases, full-weight diffs).
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            metadata = f.metadata() or {}
            # diffusers drops these while it converts (with a log line), so they are looked for in the file;
            # all-zero diffs change nothing (diffusers purges them as ineffective) and pass.
            dropped = [k for k in keys if "dora_scale" in k or (k.endswith(_DIFFS) and f.get_tensor(k).any())]
    except Exception as exc:  # safetensors raises several types for unreadable files
        raise LoraFileError(f"{path} is not a readable .safetensors LoRA file: {exc}") from None
    if dropped:
        raise _not_plain(path, dropped)
    family = lora_family(models)
    reader = f"diffusers' {family.pipeline_class().__name__}.lora_state_dict"
    try:
        read, alphas = family.lora_state_dict(path, models)
    except Exception as exc:  # diffusers' converters assert, raise KeyError or ValueError on layouts they do not know
        detail = " ".join(str(exc).split())  # on one line: its messages list keys on several
        raise _unreadable(path, keys, f"{reader} cannot read it ({type(exc).__name__}: {detail})") from None
    state = _peft_names(read)
    extra = [key for key in state if not key.endswith((".lora_A.weight", ".lora_B.weight"))]
    if extra:  # kept by diffusers, for peft: DoRA's lora_magnitude_vector, lora_B.bias
        raise _not_plain(path, extra)
    down_alphas = _peft_names(_alphas_by_down_key(read, alphas or {}))
    adapter_config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    layers = _layers(models)
    weights = {}
    for key, down in state.items():
        if ".lora_A." not in key:
            continue
        stem = key.split(".lora_A.")[0]
        prefix, module = stem.split(".", 1)
        if prefix.startswith("text_encoder") and stem not in layers:
            stem = f"{prefix}.{module.removeprefix('text_model.')}"  # written canonically, loaded without the wrapper
        up = state.get(key.replace(".lora_A.", ".lora_B."))
        if stem not in layers or up is None:
            raise _unreadable(path, keys, f"{reader} gives {stem}, which is no layer of this base model")
        alpha = down_alphas.get(key)
        if alpha is None:
            alpha = adapter_config.get(f"{prefix}.lora_alpha", down.shape[0])
        # Copies: diffusers' split of a fused qkv gives to_q, to_k and to_v one shared A tensor.
        weights[stem] = LoraWeights(down.to(torch.float32, copy=True), up.to(torch.float32, copy=True), float(alpha))
    if not weights:
        raise _unreadable(path, keys, f"{reader} finds no LoRA layers in it")
    return weights


def _unreadable(path: Path, keys: list[str], reason: str) -> LoraFileError:
    return LoraFileError(
        f"{path.name}: {reason}. Its keys: {_some(keys) or 'none'}. It is no LoRA of this base model in a layout "
        "diffusers loads (kohya/A1111, LoCon, kohya FLUX, XLabs, diffusers/peft are): check that the file is a LoRA "
        "(not LoHa/LoKr or a full checkpoint) and that the base model (model_name) is the one it was trained for"
    )


_DIFFS = (".diff", ".diff_b")  # kohya/LyCORIS full-weight and bias differences of a layer


def _not_plain(path: Path, dropped: list[str]) -> LoraFileError:
    """The refusal of a file with tensors besides LoRA matrices and alphas: converting, merging or resuming
    it would drop them without a word, and the result would not be the LoRA its maker trained."""
    kinds = sorted({_extra_kind(key) for key in dropped})
    return LoraFileError(
        f"{path.name} holds {' and '.join(kinds)} ({_some(dropped)}), which convert-lora, merge-loras and resume_from "
        "cannot carry: they read a LoRA's down/up matrices and alphas only. generate-image may still use it; "
        "to convert, merge or continue it, export it again as a plain LoRA from the tool that made it "
        "(kohya sd-scripts/LyCORIS: without dora_wd, without bias or full-weight diff training)"
    )


def _some(keys: list[str]) -> str:
    """The first four keys, and how many there are when more."""
    return ", ".join(sorted(keys)[:4]) + (f", ... ({len(keys)} keys)" if len(keys) > 4 else "")


def _extra_kind(key: str) -> str:
    if "dora_scale" in key or "lora_magnitude_vector" in key:
        return "DoRA magnitudes"
    if key.endswith((".bias", ".diff_b")):
        return "LoRA biases"
    if key.endswith(".diff"):
        return "full-weight differences"
    return "tensors that are no LoRA matrices"


def _peft_names(state: dict) -> dict:
    """diffusers' names (attention-processor `to_q_lora.down`, `lora.down`, `lora_linear_layer.down`) as
    peft's (`to_q.lora_A`), with diffusers' own key conversions, as its loaders do before peft loads them."""
    encoders = {key: value for key, value in state.items() if key.startswith("text_encoder")}
    denoiser = convert_unet_state_dict_to_peft({k: v for k, v in state.items() if k not in encoders})
    if any("lora_linear_layer" in key or "to_out_lora" in key for key in encoders):
        encoders = convert_state_dict_to_peft(encoders)
    return denoiser | encoders


def _alphas_by_down_key(state: dict, alphas: dict) -> dict:
    """{key of a LoRA down (A) matrix: its alpha}. diffusers keys network alphas by the module
    (`unet.<module>.alpha`, `transformer.<module>.alpha`) or by the down key itself
    (`...to_q_lora.down.weight.alpha`)."""
    found = {}
    for key in state:
        stem = key
        for suffix in (".lora.down.weight", ".lora_A.weight", ".lora_linear_layer.down.weight", ".down.weight"):
            if key.endswith(suffix):
                stem = key.removesuffix(suffix)
                break
        else:
            continue
        alpha = alphas.get(f"{key}.alpha", alphas.get(f"{stem}.alpha"))
        if alpha is not None:
            found[key] = float(alpha)
    return found


def _layers(models: dict[str, torch.nn.Module]) -> set[str]:
    """`<prefix>.<module>` of every layer a LoRA may adapt: linear and conv layers (LoCon), or peft's wrappers."""
    return {
        f"{prefix}.{name}"
        for prefix, model in models.items()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d | LoraLayer)
    }


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
                raise LoraFileError(
                    f"the LoRA has weights for {name}, which this run does not train: add {_short_name(name)!r} "
                    "to target_modules (with the family's defaults) to continue it"
                )
            layer = layers[name]
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            old_rank, new_rank = w.down.shape[0], a.shape[0]
            if old_rank > new_rank:
                raise LoraFileError(f"the LoRA has rank {old_rank}; set rank to {old_rank} or more to continue it")
            # Everything but the rank must match: inputs and kernel (a LoCon's 3x3 against a 1x1 conv), outputs.
            if w.down.shape[1:] != a.shape[1:] or w.up.shape[0] != b.shape[0] or w.up.shape[2:] != b.shape[2:]:
                raise LoraFileError(
                    f"the LoRA's layer {name} is {_layer_shape(w.down, w.up)}, this run's is {_layer_shape(a, b)}: "
                    "the file was made for another base model (model_name) or architecture"
                )
            rescale = (w.alpha / old_rank) / layer.scaling["default"]
            a[:old_rank] = w.down.to(a)
            b.zero_()
            b[:, :old_rank] = (w.up * rescale).to(b)
    missing = sorted(set(layers) - set(weights))
    return [f"{len(missing)} trained module(s) are not in the LoRA and start from zero"] if missing else []


def _layer_shape(down: torch.Tensor, up: torch.Tensor) -> str:
    """A LoRA layer's shape without its rank: `320 -> 320 features, 3x3 kernel`."""
    kernel = "x".join(str(size) for size in down.shape[2:])
    return f"{down.shape[1]} -> {up.shape[0]} features" + (f", {kernel} kernel" if kernel else "")
