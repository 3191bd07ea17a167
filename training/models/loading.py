"""Finding and loading a base model, offline.

`model_name` may be a built-in id (`builtin:tiny-sd15`), a local diffusers folder, a
single-file checkpoint (`.safetensors` / `.ckpt`), or a Hugging Face id that is already in
the local HF cache (fetched only when the machine is online and HF_HUB_OFFLINE is unset).
Whatever the source, the result is one `BaseModel`: the pipeline of its family
(StableDiffusionPipeline, StableDiffusionXLPipeline or FluxPipeline) with a `denoiser` (UNet or
transformer) and the family's geometry and training scheduler.
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
    from diffusers import AutoencoderKL, DiffusionPipeline, SchedulerMixin
    from transformers import CLIPTextModel, CLIPTokenizer

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
ModelFamily = Literal["sd1", "sd2", "sdxl", "flux"]  # what this trainer recognises and trains
FAMILY_NAMES = {  # as a sentence says it
    "sd1": "a Stable Diffusion 1.x",
    "sd2": "a Stable Diffusion 2.x",
    "sdxl": "an SDXL",
    "flux": "a FLUX-class",
}


class ModelNotFoundError(RuntimeError):
    """The base model could not be found or loaded; the message says where we looked."""


class QuantizationUnavailable(RuntimeError):
    """quantize_base asks for a library that is not installed; the message names it."""


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["builtin", "folder", "single_file", "hub"]
    path: Path  # a diffusers folder, or the single file
    config_folder: Path | None = None  # for single files: the diffusers folder giving the architecture


@dataclass
class BaseModel:
    source: ModelSource
    pipeline: DiffusionPipeline  # StableDiffusion(XL)Pipeline or FluxPipeline
    # The training-time scheduler, from the model's own scheduler config: DDPM for SD, the
    # flow-matching Euler scheduler for FLUX.
    noise_scheduler: SchedulerMixin
    family: ModelFamily
    native_resolution: int  # 512 for SD 1.5, 1024 for SDXL and FLUX, 64 for the tiny built-ins
    vae_scale_factor: int
    # Pixels by which bucket sides step: VAE factor x UNet downsampling (64 for SD); VAE factor x 2
    # for FLUX, whose transformer sees 2x2 patches of latents (16).
    bucket_step: int

    @property
    def denoiser(self) -> torch.nn.Module:
        """What is trained: the UNet of SD 1.x/2.x/SDXL, the transformer of FLUX."""
        return self.pipeline.transformer if self.family == "flux" else self.pipeline.unet

    @property
    def device(self) -> torch.device:
        """Where the denoiser computes: its first parameter's device. (diffusers' ModelMixin.device walks
        every module looking for offload hooks: ~6 ms on the tiny UNet, 10% of a training step.)"""
        return next(self.denoiser.parameters()).device

    @property
    def quantized(self) -> bool:
        """The denoiser's frozen weights are 8-bit (quantize_base): they keep their storage type."""
        return getattr(self.denoiser, "hf_quantizer", None) is not None

    @property
    def denoiser_prefix(self) -> str:
        """Its name in LoRA files: `unet` (kohya `lora_unet_`) or `transformer`."""
        return "transformer" if self.family == "flux" else "unet"

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
        """SDXL's second CLIP encoder (CLIPTextModelWithProjection), FLUX's T5 encoder; None for SD 1.x/2.x."""
        return getattr(self.pipeline, "text_encoder_2", None)

    @property
    def tokenizer_2(self):
        return getattr(self.pipeline, "tokenizer_2", None)

    @property
    def lora_models(self) -> dict[str, torch.nn.Module]:
        """The models a LoRA may adapt, by their prefix in LoRA files: what training/lora.py's functions
        take. FLUX's text encoders are not trained (CLIP gives only the pooled vector, T5 is 4.7 B
        parameters), so its LoRA is the transformer's alone."""
        if self.family == "flux":
            return {"transformer": self.denoiser}
        models = {"unet": self.denoiser, "text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            models["text_encoder_2"] = self.text_encoder_2
        return models

    @property
    def prediction_type(self) -> str:
        """epsilon or v_prediction (SD), flow_matching (FLUX: the velocity noise - image)."""
        return "flow_matching" if self.family == "flux" else self.noise_scheduler.config.prediction_type

    @property
    def guidance_embedded(self) -> bool:
        """FLUX.1-dev and Flex.1 take the guidance scale as an input (distilled guidance); schnell does not."""
        return self.family == "flux" and bool(self.denoiser.config.guidance_embeds)

    @property
    def base_model_version(self) -> str:
        """The kohya `ss_base_model_version` tag: sd_v1, sd_v2, sd_v2_v (v-prediction), sdxl_base_v1-0 or flux1."""
        if self.family in ("sd1", "sdxl", "flux"):
            return {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}[self.family]
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


def unsupported_family_message(model_name: str, family: str, detected: str | None = None) -> str | None:
    """Why a model of `family` cannot be trained, or None when it can: an unknown family, or a
    model_family override that contradicts what the model's files say (`detected`)."""
    if family not in FAMILY_NAMES:
        return f"model_family {family!r} of {model_name} is not one of auto, sd1, sd2, sdxl, flux"
    if detected is not None and detected != family:
        return (
            f"model_family is {family}, but the files of {model_name} say it is {FAMILY_NAMES[detected]} model: "
            "set model_family to auto (the override is for single files whose architecture cannot be read)"
        )
    return None


def load_base_model(
    source: ModelSource,
    device: torch.device,
    *,
    model_family: str = "auto",
    quantize: str = "none",
    mixed_precision: str = "no",
    text_on_cpu: bool = False,
) -> BaseModel:
    """Load every component of the pipeline, frozen and in eval mode: in fp32, or on CUDA with
    `mixed_precision` in the types placement.frozen_dtypes gives (a diffusers folder is read straight
    into them; a single file in the main type, its VAE and T5 cast after). LoRA weights train in fp32
    either way. The family (read from the model's files, or `model_family` when not auto) picks the pipeline
    class. `quantize` "8bit" loads a FLUX transformer with 8-bit weights (see flux_transformer);
    `text_on_cpu` leaves the text encoders on the CPU (low_vram: they never occupy the GPU)."""
    detected = detect_family(source)
    family = detected if model_family == "auto" else model_family
    if family and (refusal := unsupported_family_message(str(source.path), family, detected)):
        raise ModelNotFoundError(refusal)
    if family == "flux" and (refusal := flux_refusal(source)):
        raise ModelNotFoundError(refusal)
    import torch
    from diffusers import DDPMScheduler, FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class, options = {
        "sdxl": (StableDiffusionXLPipeline, {}),
        "flux": (FluxPipeline, {}),
    }.get(family, (StableDiffusionPipeline, {"safety_checker": None, "requires_safety_checker": False}))
    from training.placement import TEXT_ENCODERS, frozen_dtypes

    dtypes = frozen_dtypes(mixed_precision, device.type, family, text_on_cpu=text_on_cpu)
    try:
        if family == "flux" and (quantize == "8bit" or source.kind == "single_file"):
            # A FLUX single file (BFL's layout) holds the transformer only; the rest of the pipeline comes
            # from base_model_config's folder, as diffusers documents for FLUX single files.
            options["transformer"] = flux_transformer(source, device, quantize=quantize, dtype=dtypes["default"])
            pipeline = pipeline_class.from_pretrained(
                str(source.config_folder if source.kind == "single_file" else source.path), dtype=dtypes, **options
            )
        elif source.kind == "single_file":  # one type for all; the VAE's own is set below
            config = str(source.config_folder) if source.config_folder else None
            pipeline = pipeline_class.from_single_file(
                str(source.path), config=config, local_files_only=True, dtype=dtypes["default"], **options
            )
        else:
            pipeline = pipeline_class.from_pretrained(str(source.path), dtype=dtypes, **options)
    except (ModelNotFoundError, QuantizationUnavailable):
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
            hint = f" Is it a checkpoint of the same architecture as base_model_config ({source.config_folder})?"
        raise ModelNotFoundError(f"could not load the model at {source.path}: {str(exc).rstrip('. ')}.{hint}") from exc

    pipeline.set_progress_bar_config(disable=True)
    if getattr(pipeline.vae.config, "latents_mean", None) is not None or type(pipeline.scheduler).__name__.startswith(
        "EDM"
    ):
        # Playground v2.5: an SDXL architecture trained with EDM noise and normalised latents; replacing its
        # scheduler by DDPM and skipping the normalisation would train it on the wrong objective.
        raise ModelNotFoundError(
            f"{source.path} is an SDXL-architecture model trained with EDM noise and normalised latents (such as "
            "Playground v2.5); this trainer trains DDPM-trained SD 1.x/2.x and SDXL models and FLUX"
        )
    for name, module in pipeline.components.items():  # the types above, also for a single file's VAE and T5
        if name in dtypes and module is not None:
            module.to(dtype=dtypes[name])
    if text_on_cpu:  # one part at a time, so the text encoders are never on the GPU, not even briefly
        for name, module in pipeline.components.items():
            if isinstance(module, torch.nn.Module) and name not in TEXT_ENCODERS and not _bitsandbytes_8bit(module):
                module.to(device)
    else:
        pipeline.to(device)
    denoiser = pipeline.transformer if family == "flux" else pipeline.unet
    for module in (denoiser, pipeline.vae, pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    vae_scale_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    if family == "flux":
        # A transformer has no sample size; the VAE's config records the size it was trained at
        # (1024 for FLUX.1), and latents are packed in 2x2 patches.
        return BaseModel(
            source=source,
            pipeline=pipeline,
            noise_scheduler=type(pipeline.scheduler).from_config(pipeline.scheduler.config),
            family="flux",
            native_resolution=int(pipeline.vae.config.sample_size),
            vae_scale_factor=vae_scale_factor,
            bucket_step=vae_scale_factor * 2,
        )
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


def _bitsandbytes_8bit(module) -> bool:
    """bitsandbytes' 8-bit models are placed on the GPU when loaded and refuse .to() (pipeline.to skips them)."""
    return bool(getattr(module, "is_loaded_in_8bit", False))


def flux_refusal(source: ModelSource) -> str | None:
    """Why a FLUX model cannot be trained, from its files alone (no weights), or None: a single file
    without base_model_config (BFL's checkpoints hold the transformer only), or a Fill / Control
    transformer, which takes image or control latents beside the noisy ones (384 / 128 input channels
    instead of 64) that this trainer's text-to-image objective does not feed."""
    if source.kind == "single_file" and source.config_folder is None:
        return (
            f"{source.path} is a FLUX checkpoint, which holds the transformer only: set base_model_config to the "
            "diffusers folder (or Hugging Face id in the local cache) of its model, e.g. black-forest-labs/FLUX.1-dev, "
            "for its VAE, text encoders and configs"
        )
    folder = source.config_folder if source.kind == "single_file" else source.path
    try:
        transformer = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        got, expected = int(transformer["in_channels"]), 4 * int(vae["latent_channels"])  # 2x2 latent patches
    except (OSError, ValueError, KeyError, TypeError):
        return None  # loading says what is missing
    if got == expected:
        return None
    return (
        f"{source.path} is a FLUX model whose transformer takes {got} input channels, not the {expected} of "
        "text-to-image FLUX (a Fill or Control model, which also conditions on an image); this trainer trains "
        "text-to-image FLUX LoRAs (FLUX.1-dev, FLUX.1-schnell, Flex.1)"
    )


def flux_transformer(source: ModelSource, device: torch.device, *, quantize: str, dtype: torch.dtype):
    """The FLUX transformer loaded on its own: from a single file, and/or with 8-bit weights (`quantize`
    "8bit": about half of its bf16 memory, 12 B parameters in ~12 GB instead of ~24 GB), through
    bitsandbytes' LLM.int8 on CUDA (its quantizer needs a GPU), else torchao's int8 weight-only (CPU or
    GPU). peft attaches trainable full-precision LoRA layers to either."""
    import importlib.util

    import torch
    from diffusers import FluxTransformer2DModel

    options: dict = {"dtype": dtype}
    if quantize == "8bit":
        if device.type == "cuda" and importlib.util.find_spec("bitsandbytes"):
            from diffusers import BitsAndBytesConfig

            options["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        elif importlib.util.find_spec("torchao"):
            from diffusers import TorchAoConfig
            from torchao.quantization import Int8WeightOnlyConfig

            options["quantization_config"] = TorchAoConfig(Int8WeightOnlyConfig())
        else:
            raise QuantizationUnavailable(
                "quantize_base 8bit needs bitsandbytes (CUDA: pip install bitsandbytes) or torchao (pip install "
                "torchao); install one, or set quantize_base to none"
            )
        options["dtype"] = torch.float32  # the layers left unquantized (norms, embeddings): small
    if source.kind == "single_file":
        return FluxTransformer2DModel.from_single_file(
            str(source.path),
            config=str(source.config_folder),
            subfolder="transformer",
            local_files_only=True,
            **options,
        )
    return FluxTransformer2DModel.from_pretrained(str(source.path), subfolder="transformer", **options)


def read_geometry(folder: Path) -> tuple[int, int] | None:
    """(native resolution, bucket step) of a diffusers folder from its config.json files, without
    loading weights: UNet sample_size x VAE scale factor, and VAE factor x UNet downsampling; for a
    FLUX transformer, the VAE's sample size and VAE factor x 2 (its 2x2 latent patches)."""
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        vae_levels = vae["block_out_channels"]
        if not vae_levels:
            return None
        vae_factor = 2 ** (len(vae_levels) - 1)
        if (folder / "transformer" / "config.json").is_file():
            sample_size = vae["sample_size"]
            return (sample_size, vae_factor * 2) if isinstance(sample_size, int) else None
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        sample_size, unet_levels = unet["sample_size"], unet["block_out_channels"]
        if not isinstance(sample_size, int) or not unet_levels:
            return None
        return sample_size * vae_factor, vae_factor * 2 ** (len(unet_levels) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pick_device() -> torch.device:
    import torch

    if os.environ.get("LORA_TRAIN_DEVICE"):
        return torch.device(os.environ["LORA_TRAIN_DEVICE"])
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
