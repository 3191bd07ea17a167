"""Finding a base model, offline.

`model_name` may be a built-in id (`builtin:tiny-sd15`), a local diffusers folder, a single-file
checkpoint (`.safetensors` / `.ckpt`), or a Hugging Face id that is already in the local HF cache. None
of them imports torch or diffusers: the cache is read with huggingface_hub. A model that is not cached is
fetched by a `download` job (training/downloads.py) when the machine is online, never here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from training.models.builtin import builtin_names, ensure_builtin, is_builtin
from training.workspace import models_dir

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
MODEL_INDEX = "model_index.json"  # what makes a folder (or a cached repository) a diffusers pipeline
# Retired hub ids and the repositories that hold them now: runwayml's SD 1.5 repository was removed in
# 2024; the community copy has the same files.
RENAMED = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


class ModelNotFoundError(RuntimeError):
    """The base model could not be found or loaded; the message says where we looked."""


class ModelNotCachedError(ModelNotFoundError):
    """A hub id that is not in the cache while the machine is online: a download job can fetch it."""

    def __init__(self, repo_id: str, message: str):
        super().__init__(message)
        self.repo_id = repo_id


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["builtin", "folder", "single_file", "hub"]
    path: Path  # a diffusers folder, or the single file
    config_folder: Path | None = None  # for single files: the diffusers folder giving the architecture


def resolve_model(model_name: str, base_model_config: str | None = None) -> ModelSource:
    """Find `model_name` without downloading anything that is not allowed to be downloaded."""
    if is_builtin(model_name):
        try:
            return ModelSource("builtin", ensure_builtin(model_name, models_dir()))
        except KeyError as exc:
            raise ModelNotFoundError(str(exc.args[0])) from None
    local = Path(model_name).expanduser()
    if local.is_dir():
        if not (local / MODEL_INDEX).is_file():
            raise ModelNotFoundError(
                f"{local} is a folder but not a diffusers pipeline (no model_index.json); point model_name at a "
                "diffusers folder, a .safetensors/.ckpt checkpoint, or a Hugging Face id"
            )
        return ModelSource("folder", local.resolve())
    if local.is_file():
        if local.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelNotFoundError(f"{local} is not a .safetensors or .ckpt checkpoint")
        config_folder = resolve_model(base_model_config).path if base_model_config else None
        return ModelSource("single_file", local.resolve(), config_folder)
    if local.suffix.lower() in SINGLE_FILE_SUFFIXES or model_name.startswith(("/", ".", "~")):
        raise ModelNotFoundError(f"model file or folder {local} does not exist")
    return ModelSource("hub", _from_hf_cache(model_name))


def _from_hf_cache(repo_id: str) -> Path:
    """The cached snapshot that holds the pipeline's model_index.json (as diffusers' own offline lookup
    finds it; a download job places that file last, so its presence means the download is complete).
    Nothing is downloaded here: that is a `download` job's work (training/downloads.py), in the
    background, never inside a tool call."""
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    from training.downloads import missing_files

    repo_id = hub_id(repo_id)
    snapshot = cached_snapshot(repo_id)
    if snapshot is not None:
        return snapshot
    if HF_HUB_OFFLINE:
        raise _not_found(repo_id, HF_HUB_CACHE, missing_files(repo_id))
    raise ModelNotCachedError(
        repo_id,
        f"model {repo_id!r} is not downloaded yet ({missing_files(repo_id)}; Hugging Face cache {HF_HUB_CACHE}): "
        "start-training downloads it first, as a download job the training waits for; download-base-model "
        "downloads it now",
    )


def cached_snapshot(repo_id: str, marker: str = MODEL_INDEX) -> Path | None:
    """The cached snapshot of `repo_id` that holds `marker`, the file a complete download has."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(repo_id, marker)
    except HFValidationError as exc:
        raise ModelNotFoundError(
            f"model_name {repo_id!r} is not a local path, a built-in or a Hugging Face id ('owner/name'): {exc}"
        ) from None
    return Path(found).parent if isinstance(found, str) else None


def hub_id(model_name: str) -> str:
    """`model_name` with a retired id replaced by the repository that now holds it, unless the retired one
    is cached (a user who has it keeps using that copy)."""
    if model_name in RENAMED and cached_snapshot(model_name) is None:
        return RENAMED[model_name]
    return model_name


def renamed_note(model_name: str) -> str | None:
    """The warning for a retired id that `hub_id` replaces."""
    if hub_id(model_name) == model_name:
        return None
    return f"model_name {model_name!r} is gone from the hub; {RENAMED[model_name]!r}, its mirror, is used instead"


def download_target(model_name: str) -> str:
    """The hub id a download job fetches for `model_name`, or a ModelNotFoundError saying why there is
    nothing to download (a built-in, a local path, a model already cached)."""
    if is_builtin(model_name):
        raise ModelNotFoundError(f"{model_name!r} is a built-in model: it is built here, nothing is downloaded")
    local = Path(model_name).expanduser()
    if local.exists() or model_name.startswith(("/", ".", "~")) or local.suffix.lower() in SINGLE_FILE_SUFFIXES:
        raise ModelNotFoundError(f"{model_name!r} is a local path, not a Hugging Face id: nothing to download")
    repo_id = hub_id(model_name)
    # a transformers model (evaluate-lora's CLIP, DINOv2) is complete with its config.json, placed last
    if cached_snapshot(repo_id) is not None or cached_snapshot(repo_id, "config.json") is not None:
        raise ModelNotFoundError(f"{repo_id!r} is already in the Hugging Face cache: use it as it is")
    return repo_id


def _not_found(model_name: str, hf_cache: str, missing: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {model_name!r} not found: it is not a local folder or file "
        f"({Path(model_name).expanduser().resolve()}), "
        f"not a built-in ({', '.join(builtin_names())}), and not complete in the Hugging Face cache ({hf_cache}): "
        f"{missing}. This machine is offline (HF_HUB_OFFLINE): download it with download-base-model once it is "
        f"online (or huggingface-cli download {model_name} on any machine, then copy the cache), or set "
        "model_name to a local diffusers folder or .safetensors file."
    )
