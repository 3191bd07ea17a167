"""Finding a base model, offline.

`model_name` may be a built-in id (`builtin:tiny-sd15`), a local diffusers folder, a single-file
checkpoint (`.safetensors` / `.ckpt`), or a Hugging Face id that is already in the local HF cache
(fetched only when the machine is online and HF_HUB_OFFLINE is unset). None of them imports torch or
diffusers: the cache is read with huggingface_hub, and a download runs in a child process
(`python -m training.models.source`, training/request_child.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from training.models.builtin import builtin_names, ensure_builtin, is_builtin
from training.request_child import RequestChildFailed, RequestRefused, run_request, serve_request
from training.workspace import models_dir

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
MODEL_INDEX = "model_index.json"  # what makes a folder (or a cached repository) a diffusers pipeline


class ModelNotFoundError(RuntimeError):
    """The base model could not be found or loaded; the message says where we looked."""


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
    finds it), else, when online, a download in a child process: deciding which of a repository's files a
    pipeline needs is diffusers' work, and diffusers (with torch) must stay out of the server."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    try:
        return Path(hf_hub_download(repo_id, MODEL_INDEX, local_files_only=True)).parent
    except Exception as cache_miss:  # huggingface_hub raises several types for "not cached" or a bad id
        if HF_HUB_OFFLINE:
            raise _not_found(repo_id, HF_HUB_CACHE) from cache_miss
    try:
        return Path(run_request("training.models.source", repo_id=repo_id)["path"])
    except (RequestRefused, RequestChildFailed) as download_error:
        raise _not_found(repo_id, HF_HUB_CACHE) from download_error


def download_pipeline(repo_id: str) -> Path:
    """Download the files of `repo_id` that its pipeline needs (diffusers chooses them) into the HF cache."""
    from diffusers import DiffusionPipeline

    return Path(DiffusionPipeline.download(repo_id))


def _not_found(model_name: str, hf_cache: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {model_name!r} not found: it is not a local folder or file "
        f"({Path(model_name).expanduser().resolve()}), "
        f"not a built-in ({', '.join(builtin_names())}), and not in the Hugging Face cache ({hf_cache}), "
        "and it could not be downloaded from here. Download it once on a machine that is online "
        f"(huggingface-cli download {model_name}), or set model_name to a local diffusers folder or "
        ".safetensors file."
    )


def main() -> int:
    """`python -m training.models.source`: download_pipeline for the server (training/request_child.py):
    {repo_id} in, {path} out."""
    return serve_request(lambda repo_id: {"path": str(download_pipeline(repo_id))}, ())


if __name__ == "__main__":
    sys.exit(main())
