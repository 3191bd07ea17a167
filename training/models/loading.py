"""Finding and loading a base model, offline.

`model_name` may be a built-in id (`builtin:tiny-sd15`), a local diffusers folder, a
single-file checkpoint (`.safetensors` / `.ckpt`), or a Hugging Face id that is already in
the local HF cache (fetched only when the machine is online and HF_HUB_OFFLINE is unset).
Whatever the source, the result is one `BaseModel` with the same components.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from training.models.builtin import builtin_names, ensure_builtin, is_builtin
from training.workspace import models_dir

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
Family = Literal["sd1", "sd2", "sdxl"]  # what this trainer trains
ModelFamily = Literal["sd1", "sd2", "sdxl", "flux"]  # what it recognises
FAMILY_NAMES = {  # as a sentence says it
    "sd1": "a Stable Diffusion 1.x",
    "sd2": "a Stable Diffusion 2.x",
    "sdxl": "an SDXL",
    "flux": "a FLUX-class",
}


class ModelNotFoundError(RuntimeError):
    """The base model could not be found or loaded; the message says where we looked."""


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["builtin", "folder", "single_file", "hub"]
    path: Path  # a diffusers folder, or the single file
    config_folder: Path | None = None  # for single files: the diffusers folder giving the architecture


@dataclass
class BaseModel:
    source: ModelSource
    pipeline: StableDiffusionPipeline
    noise_scheduler: DDPMScheduler  # the training-time scheduler, from the model's own scheduler config
    family: Family
    native_resolution: int  # sample_size x VAE scale factor: 512 for SD 1.5, 64 for the tiny built-ins
    vae_scale_factor: int
    bucket_step: int  # pixels by which bucket sides step: VAE factor x UNet downsampling (64 for SD)

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.pipeline.unet

    @property
    def vae(self) -> AutoencoderKL:
        return self.pipeline.vae

    @property
    def text_encoder(self) -> CLIPTextModel:
        return self.pipeline.text_encoder

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return self.pipeline.tokenizer

    @property
    def text_encoder_2(self):
        """SDXL's second text encoder (CLIPTextModelWithProjection); None for SD 1.x/2.x."""
        return getattr(self.pipeline, "text_encoder_2", None)

    @property
    def tokenizer_2(self):
        return getattr(self.pipeline, "tokenizer_2", None)

    @property
    def lora_models(self) -> tuple:
        """(unet, text_encoder, text_encoder_2 or None): what training/lora.py's functions take."""
        return self.unet, self.text_encoder, self.text_encoder_2

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def base_model_version(self) -> str:
        """The kohya `ss_base_model_version` tag: sd_v1, sd_v2, sd_v2_v (v-prediction) or sdxl_base_v1-0."""
        if self.family == "sd1":
            return "sd_v1"
        if self.family == "sdxl":
            return "sdxl_base_v1-0"
        return "sd_v2_v" if self.prediction_type == "v_prediction" else "sd_v2"


def resolve_model(model_name: str, base_model_config: str | None = None) -> ModelSource:
    """Find `model_name` without downloading anything that is not allowed to be downloaded."""
    if is_builtin(model_name):
        try:
            return ModelSource("builtin", ensure_builtin(model_name, models_dir()))
        except KeyError as exc:
            raise ModelNotFoundError(str(exc.args[0])) from None
    local = Path(model_name).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
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
    from diffusers import DiffusionPipeline
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    try:
        return Path(DiffusionPipeline.download(repo_id, local_files_only=True))
    except Exception as cache_miss:  # diffusers raises several types for "not cached"
        if HF_HUB_OFFLINE:
            raise _not_found(repo_id, HF_HUB_CACHE) from cache_miss
    try:
        return Path(DiffusionPipeline.download(repo_id))
    except Exception as download_error:
        raise _not_found(repo_id, HF_HUB_CACHE) from download_error


def _not_found(model_name: str, hf_cache: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {model_name!r} not found: it is not a local folder or file "
        f"({Path(model_name).expanduser().resolve()}), "
        f"not a built-in ({', '.join(builtin_names())}), and not in the Hugging Face cache ({hf_cache}), "
        "and it could not be downloaded from here. Download it once on a machine that is online "
        f"(huggingface-cli download {model_name}), or set model_name to a local diffusers folder or "
        ".safetensors file."
    )


def detect_family(source: ModelSource) -> ModelFamily | None:
    """The model's architecture from its own files, not its name: model_index.json names the pipeline
    and its components (a second text encoder: SDXL; a transformer: FLUX-class), and the UNet's config
    tells SD 2.x (linear projections, 1024-wide cross-attention) from SD 1.x. A single-file checkpoint
    without base_model_config is judged by its tensor names and shapes. None when the files cannot tell."""
    folder = source.config_folder if source.kind == "single_file" else source.path
    if folder is None:
        return _checkpoint_family(source.path)
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        pipeline, transformer = str(index.get("_class_name", "")), str(index.get("transformer"))
        if pipeline.startswith("Flux") or "FluxTransformer2DModel" in transformer:
            return "flux"
        if "transformer" in index:  # SD3, PixArt, ...: a transformer pipeline of a family this trainer does not know
            return None
        if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
            return "sdxl"
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return "sd2" if unet.get("use_linear_projection") or unet.get("cross_attention_dim") == 1024 else "sd1"


# diffusers' names for the checkpoint types of the families this trainer knows (single_file_utils).
_CHECKPOINT_FAMILIES = {"v1": "sd1", "v2": "sd2", "xl_base": "sdxl", "playground-v2-5": "sdxl"}


def _checkpoint_family(path: Path) -> ModelFamily | None:
    """The family of a .safetensors checkpoint from its header alone: diffusers' own single-file
    inference runs on tensors of the right shapes on the meta device, so no weight is read."""
    if path.suffix.lower() != ".safetensors":
        return None  # a pickled .ckpt would have to be unpickled to be read
    import torch
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = {key: torch.empty(f.get_slice(key).get_shape(), device="meta") for key in f.keys()}
    except Exception:  # not a safetensors file: loading it says why
        return None
    kind = infer_diffusers_model_type(header)
    return "flux" if kind.startswith("flux") else _CHECKPOINT_FAMILIES.get(kind)


def unsupported_family_message(model_name: str, family: str) -> str | None:
    """Why this trainer cannot train a model of `family`, or None when it can."""
    if family in ("sd1", "sd2", "sdxl"):
        return None
    if family not in FAMILY_NAMES:
        return f"model_family {family!r} is not one of auto, sd1, sd2, sdxl, flux"
    return (
        f"{model_name} is {FAMILY_NAMES[family]} model (read from its files, or model_family); this trainer "
        "trains Stable Diffusion 1.x/2.x and SDXL models so far: choose one of those (e.g. "
        "runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0, or builtin:tiny-sd15 to try "
        "things out)"
    )


def load_base_model(source: ModelSource, device: torch.device, *, model_family: str = "auto") -> BaseModel:
    """Load every component of the pipeline in fp32 (LoRA weights train in fp32 on any device;
    autocast handles mixed precision), frozen and in eval mode. A model of a family this trainer
    cannot train (read from its files, or `model_family` when not auto) is refused before loading."""
    family = detect_family(source) if model_family == "auto" else model_family
    if family and (refusal := unsupported_family_message(str(source.path), family)):
        raise ModelNotFoundError(refusal)
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    sd_options = {"safety_checker": None, "requires_safety_checker": False}
    pipeline_class, options = (
        (StableDiffusionXLPipeline, {}) if family == "sdxl" else (StableDiffusionPipeline, sd_options)
    )
    try:
        if source.kind == "single_file":
            config = str(source.config_folder) if source.config_folder else None
            pipeline = pipeline_class.from_single_file(
                str(source.path), config=config, local_files_only=True, **options
            )
        else:
            pipeline = pipeline_class.from_pretrained(str(source.path), **options)
    except ModelNotFoundError:
        raise
    except Exception as exc:
        if source.kind != "single_file":
            hint = ""
        elif source.config_folder is None:
            hint = (
                " A single-file checkpoint needs its architecture's configs offline: set base_model_config to a "
                "diffusers folder (or built-in id) of the same architecture."
            )
        else:
            hint = (
                " Is it a Stable Diffusion 1.x/2.x checkpoint (.safetensors/.ckpt) of the same architecture as "
                f"base_model_config ({source.config_folder})?"
            )
        raise ModelNotFoundError(f"could not load the model at {source.path}: {str(exc).rstrip('. ')}.{hint}") from exc

    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(device)
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    vae_scale_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    unet_downsampling = 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
    return BaseModel(
        source=source,
        pipeline=pipeline,
        noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
        # SD 2.x UNets use linear projections in their transformer blocks; SD 1.x use 1x1 convs.
        family="sdxl" if family == "sdxl" else "sd2" if pipeline.unet.config.use_linear_projection else "sd1",
        native_resolution=pipeline.unet.config.sample_size * vae_scale_factor,
        vae_scale_factor=vae_scale_factor,
        bucket_step=vae_scale_factor * unet_downsampling,
    )


def read_geometry(folder: Path) -> tuple[int, int] | None:
    """(native resolution, bucket step) of a diffusers folder from its config.json files, without
    loading weights: UNet sample_size x VAE scale factor, and VAE factor x UNet downsampling."""
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        sample_size = unet["sample_size"]
        vae_levels, unet_levels = vae["block_out_channels"], unet["block_out_channels"]
        if not isinstance(sample_size, int) or not vae_levels or not unet_levels:
            return None
        vae_factor = 2 ** (len(vae_levels) - 1)
        return sample_size * vae_factor, vae_factor * 2 ** (len(unet_levels) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pick_device() -> torch.device:
    import torch

    if os.environ.get("LORA_TRAIN_DEVICE"):
        return torch.device(os.environ["LORA_TRAIN_DEVICE"])
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
