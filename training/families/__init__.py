"""The model families this trainer knows, one module each (sd.py: SD 1.x/2.x, sdxl.py, flux.py, sd3.py,
chroma.py, qwen_image.py, z_image.py, flux2.py), behind the interface of base.py (flow.py: what the transformer ones
share); and the one resolution of a model's family that the trainer (load_base_model) and the server's config
checks (server/configs.py check_model) share.

A model's family is read from its own files, not its name: model_index.json names the pipeline and
its components, the component configs say the rest; a single-file checkpoint without
base_model_config is judged by its tensor names and shapes. `model_family` in a config overrides
that only where the files cannot tell (a single file); an override that contradicts them is refused.
Where no file can be read (a model not downloaded yet), `guess_family` judges by its name and size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from training.families.base import ModelFamily, read_config
from training.families.checkpoint import checkpoint_kind
from training.families.chroma import CHROMA
from training.families.flux import FLUX
from training.families.flux2 import FLUX2
from training.families.qwen_image import QWEN_IMAGE
from training.families.sd import SD1, SD2
from training.families.sd3 import SD3
from training.families.sdxl import SDXL
from training.families.z_image import Z_IMAGE
from training.request_child import run_request

if TYPE_CHECKING:
    from training.models.source import ModelSource

FAMILIES: dict[str, ModelFamily] = {
    family.id: family for family in (SD1, SD2, SDXL, FLUX, SD3, CHROMA, QWEN_IMAGE, Z_IMAGE, FLUX2)
}
# Files are judged by a transformer before a UNet: a FLUX pipeline also has a second text encoder, which
# alone would read as SDXL.
RECOGNITION_ORDER = sorted(FAMILIES.values(), key=lambda family: family.denoiser_prefix != "transformer")
# What files that do not say their family are taken for: SD 1.x/2.x. A single file whose header does not
# say (and no model_family) loads so, and the loaded UNet's config tells 1.x from 2.x; a folder or LoRA
# with neither denoiser is read so, and fails with SD's message, which names unet/.
UNKNOWN_FAMILY = SD1


def default_guidances() -> str:
    """Each family's default sample guidance, as tool descriptions list it: "7.5 SD 1.5, ..., 3.5 FLUX, ..."."""
    named: dict[str, list[str]] = {}
    for family in FAMILIES.values():
        named.setdefault(f"{family.sample_guidance:g}", []).append(family.name + family.guidance_note)
    return "; ".join(f"{value} {', '.join(names)}" for value, names in named.items())


def guess_family(model_name: str, native_resolution: int | None) -> ModelFamily:
    """The family a model's name and native size suggest, where its files do not say. A name that says a
    family that no size tells (FLUX and its Flex derivatives, 1024 px as SDXL) decides; else the native size,
    the family whose own is nearest (512 SD 1.5, smaller: a tiny test model, counted as SD 1.5; 768 SD 2.x;
    1024 SDXL; the smaller on a tie); an unknown size: the name ('xl', 'sd2', 'stable-diffusion-2'), else SD 1.5
    (the default model). Names are read newest family first: a newer family's model names carry the older
    ones' numbers ('sdxl-2.0')."""
    name = model_name.lower()
    named = next((family for family in reversed(FAMILIES.values()) if family.named_by(name)), None)
    if named is not None and not named.told_by_size:
        return named
    if native_resolution is None:
        return named or UNKNOWN_FAMILY
    sized = (family for family in FAMILIES.values() if family.told_by_size)
    return min(sized, key=lambda family: abs(family.hardware.native - native_resolution))


class FamilyCheck(NamedTuple):
    family: str | None  # the model_family override, else what the files say; None when neither says
    refusal: str | None  # why a model of that family cannot be trained, or None


def check_family(source: ModelSource, model_family: str = "auto", *, model_name: str) -> FamilyCheck:
    """The family of `source`, or `model_family` when not auto, and whether it can be trained.
    `model_name` is how messages name the model."""
    detected = detect_family(source)
    family = detected if model_family == "auto" else model_family
    if family is None:
        return FamilyCheck(None, None)
    if family not in FAMILIES:
        refusal = f"model_family {family!r} of {model_name} is not one of auto, {', '.join(FAMILIES)}"
    elif detected is not None and detected != family:
        refusal = (
            f"model_family is {family}, but the files of {model_name} say it is {FAMILIES[detected].described} "
            "model: set model_family to auto (the override is for single files whose architecture cannot be read)"
        )
    else:
        refusal = FAMILIES[family].refusal(source)
    return FamilyCheck(family, refusal)


def detect_family(source: ModelSource) -> str | None:
    """The family id that the model's files say (see the module's docstring); None when they cannot tell."""
    folder = source.config_folder if source.kind == "single_file" else source.path
    if folder is None:
        return checkpoint_family(source.path)
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # PixArt, AuraFlow, ...: a transformer pipeline of a family this trainer does not know is recognised by none.
    return next((family.id for family in RECOGNITION_ORDER if family.recognises(index, folder)), None)


def checkpoint_family(path: Path) -> str | None:
    """The family of a .safetensors checkpoint from its header alone (training/families/checkpoint.py).
    That reading needs torch and diffusers: a process that has them (the trainer) reads it itself, any
    other (the server, which must never import them) asks a short-lived child."""
    if path.suffix.lower() != ".safetensors":
        return None  # a pickled .ckpt would have to be unpickled to be read
    if "diffusers" in sys.modules:
        kind = checkpoint_kind(path)
    else:
        kind = run_request("training.families.checkpoint", path=str(path))["kind"]
    if kind is None:  # not a safetensors file: loading it says why
        return None
    return next((family.id for family in FAMILIES.values() if family.recognises_checkpoint(kind)), None)


def read_geometry(folder: Path) -> tuple[int, int] | None:
    """(native resolution, bucket step) of a diffusers folder from its config.json files, without
    loading weights: the family whose denoiser the folder holds (unet/ or transformer/) computes them."""
    family = folder_family(folder)
    try:
        vae = read_config(folder / "vae" / "config.json")
        return family.geometry(vae, read_config(folder / family.denoiser_prefix / "config.json"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# Where only the denoiser matters (its sizes, the layers a LoRA adapts, the file layouts), SD 1.x/2.x and
# SDXL's UNets are one: the two functions below judge by the denoiser's class, which tells apart the transformer
# families (every one's component and LoRA prefix is `transformer`), and answer SD's family for a UNet (the
# first family of that class). A denoiser of a class no family names is taken by its prefix, as the first
# family with that prefix (an unknown transformer: FLUX's).
def folder_family(folder: Path) -> ModelFamily:
    """The family whose denoiser's config.json a diffusers folder holds."""
    classes = {}
    for prefix in {family.denoiser_prefix for family in FAMILIES.values()}:
        try:
            classes[prefix] = read_config(folder / prefix / "config.json").get("_class_name")
        except (OSError, ValueError):
            continue
    return _denoiser_family(classes)


def lora_family(models) -> ModelFamily:
    """The family whose denoiser is among the models a LoRA may adapt (by prefix: `unet`, `transformer`)."""
    return _denoiser_family({prefix: type(model).__name__ for prefix, model in models.items()})


def _denoiser_family(classes: dict[str, str | None]) -> ModelFamily:
    """The family of a denoiser from {component prefix: its class name}."""
    by_class = (family for family in FAMILIES.values() if classes.get(family.denoiser_prefix) == family.denoiser_class)
    by_prefix = (family for family in RECOGNITION_ORDER if family.denoiser_prefix in classes)
    return next(by_class, None) or next(by_prefix, UNKNOWN_FAMILY)
