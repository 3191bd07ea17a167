"""Loading a base model, offline, into one `LoadedModel`: the pipeline of its family
(StableDiffusionPipeline, StableDiffusionXLPipeline or FluxPipeline) with a `denoiser` (UNet or
transformer), the family's geometry and training scheduler, frozen, in the storage types that
`frozen_dtypes` gives. What differs by family is asked of its module in training/families/.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from training.families import FAMILIES, UNKNOWN_FAMILY, ModelFamily, check_family
from training.families.transformer_loading import QuantizationUnavailable
from training.models.source import ModelNotFoundError, ModelSource

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, DiffusionPipeline, SchedulerMixin
    from transformers import CLIPTextModel, CLIPTokenizer

    from training.prompts import TextConditioning


@dataclass
class LoadedModel:
    source: ModelSource
    pipeline: DiffusionPipeline  # StableDiffusion(XL)Pipeline or FluxPipeline
    # The training-time scheduler, from the model's own scheduler config: DDPM for SD, the
    # flow-matching Euler scheduler for FLUX.
    noise_scheduler: SchedulerMixin
    family: str  # sd1, sd2, sdxl or flux: a key of training.families.FAMILIES
    native_resolution: int  # 512 for SD 1.5, 1024 for SDXL and FLUX, 64 for the tiny built-ins
    vae_scale_factor: int
    # Pixels by which bucket sides step: VAE factor x UNet downsampling (64 for SD); VAE factor x 2
    # for FLUX, whose transformer sees 2x2 patches of latents (16).
    bucket_step: int
    # Prompt -> its conditioning (no batch dimension, on the CPU) once the text encoders are released after
    # caching (training/prompts.py release_text_encoders): what encode_text answers from then on.
    encoded_prompts: dict[str, TextConditioning] | None = None

    @property
    def family_rules(self) -> ModelFamily:
        """What the trainer does differently for this model's family."""
        return FAMILIES[self.family]

    @property
    def denoiser(self) -> torch.nn.Module:
        """What is trained: the UNet of SD 1.x/2.x/SDXL, the transformer of FLUX."""
        return getattr(self.pipeline, self.denoiser_prefix)

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
        return self.family_rules.denoiser_prefix

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
        """The models a LoRA may adapt, by their prefix in LoRA files: what training/lora.py's functions take."""
        return self.family_rules.lora_models(self)

    @property
    def prediction_type(self) -> str:
        """epsilon or v_prediction (SD), flow_matching (FLUX: the velocity noise - image)."""
        return self.family_rules.prediction_type(self)

    @property
    def guidance_embedded(self) -> bool:
        """Whether the model takes the guidance scale as an input (FLUX.1-dev and Flex.1; schnell does not)."""
        return self.family_rules.guidance_embedded(self)

    @property
    def base_model_version(self) -> str:
        """The kohya `ss_base_model_version` tag: sd_v1, sd_v2, sd_v2_v (v-prediction), sdxl_base_v1-0 or flux1."""
        return self.family_rules.base_model_version(self)


def frozen_dtypes(
    mixed_precision: str, device_type: str, family: str | None, *, text_on_cpu: bool = False
) -> dict[str, torch.dtype]:
    """The storage type of the frozen weights by pipeline component ("default": the rest), as
    diffusers' from_pretrained takes it: the mixed-precision type where the device runs it (placement.py
    PRECISIONS: CUDA, MPS and the CPU), fp32 elsewhere. Under fp16 the components of the family's
    `fp16_overflows` stay fp32 (SD and SDXL VAEs overflow in fp16; SDXL's sets force_upcast; FLUX's T5
    too); they encode once anyway, and so do text encoders kept on the CPU (`text_on_cpu`), which has no
    fast fp16. Loading FLUX straight in bf16 halves what its fp32 load would put on the GPU (12 B + 4.7 B
    parameters: ~34 GB instead of ~67 GB)."""
    import torch

    from training.placement import half_dtype

    dtype = half_dtype(mixed_precision, device_type)
    if dtype is None:
        return {"default": torch.float32}
    dtypes = {"default": dtype}
    if dtype == torch.float16:
        rules = FAMILIES.get(family, UNKNOWN_FAMILY)
        dtypes.update(dict.fromkeys(rules.fp16_overflows, torch.float32))
        if text_on_cpu:
            dtypes.update(dict.fromkeys(rules.text_encoders, torch.float32))
    return dtypes


def load_base_model(
    source: ModelSource,
    device: torch.device,
    *,
    model_family: str = "auto",
    quantize: str = "none",
    mixed_precision: str = "no",
    text_on_cpu: bool = False,
) -> LoadedModel:
    """Load every component of the pipeline, frozen and in eval mode: in fp32, or with `mixed_precision`
    in the types frozen_dtypes gives for the device (a diffusers folder is read straight into them; a
    single file in the main type, its VAE and T5 cast after). LoRA weights train in fp32 either way.
    The family (read from the model's files, or `model_family` when not auto) loads the pipeline.
    `quantize` "8bit" loads a transformer with 8-bit weights (see families/transformer_loading.py);
    `text_on_cpu` leaves the text encoders on the CPU (low_vram: they never occupy the GPU)."""
    family_id, refusal = check_family(source, model_family, model_name=str(source.path))
    if refusal:
        raise ModelNotFoundError(refusal)
    import torch

    family = FAMILIES[family_id] if family_id else UNKNOWN_FAMILY
    dtypes = frozen_dtypes(mixed_precision, device.type, family_id, text_on_cpu=text_on_cpu)
    try:
        pipeline = family.load_pipeline(source, device, dtypes, quantize=quantize)
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
    if refusal := family.check_loaded(pipeline, source):
        raise ModelNotFoundError(refusal)
    for name, module in pipeline.components.items():  # the types above, also for a single file's VAE and T5
        if name in dtypes and module is not None:
            module.to(dtype=dtypes[name])
    if text_on_cpu:  # one part at a time, so the text encoders are never on the GPU, not even briefly
        for name, module in pipeline.components.items():
            text_encoder = name in family.text_encoders
            if isinstance(module, torch.nn.Module) and not text_encoder and not _bitsandbytes_8bit(module):
                module.to(device)
    else:
        pipeline.to(device)
    denoiser = getattr(pipeline, family.denoiser_prefix)
    encoders = [getattr(pipeline, name, None) for name in family.text_encoders]
    for module in (denoiser, pipeline.vae, *encoders):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    geometry = family.geometry(pipeline.vae.config, denoiser.config)
    if geometry is None:
        raise ModelNotFoundError(
            f"{source.path}: its vae and {family.denoiser_prefix} configs give no native size (sample_size, "
            "block_out_channels); is it a complete diffusers model?"
        )
    native_resolution, bucket_step = geometry
    return LoadedModel(
        source=source,
        pipeline=pipeline,
        noise_scheduler=family.training_scheduler(pipeline),
        family=family.loaded_id(pipeline),
        native_resolution=native_resolution,
        vae_scale_factor=family.vae_scale_factor(pipeline.vae.config),
        bucket_step=bucket_step,
    )


def _bitsandbytes_8bit(module) -> bool:
    """bitsandbytes' 8-bit models are placed on the GPU when loaded and refuse .to() (pipeline.to skips them)."""
    return bool(getattr(module, "is_loaded_in_8bit", False))


@dataclass(frozen=True)
class DeviceProbe:
    """The questions pick_device asks of the machine (torch's answers unless a test gives its own)."""

    cuda: Callable[[], bool]
    mps: Callable[[], bool]


def pick_device(probe: DeviceProbe | None = None) -> torch.device:
    """LORA_TRAIN_DEVICE when set (e.g. `cpu` on a CUDA machine), else the first present of an NVIDIA GPU
    (CUDA), an Apple GPU (MPS) and the CPU."""
    import torch

    if os.environ.get("LORA_TRAIN_DEVICE"):
        return torch.device(os.environ["LORA_TRAIN_DEVICE"])
    probe = probe or DeviceProbe(cuda=torch.cuda.is_available, mps=torch.backends.mps.is_available)
    if probe.cuda():
        return torch.device("cuda")
    if probe.mps():
        return torch.device("mps")
    return torch.device("cpu")


def device_memory_gb(device: torch.device) -> float | None:
    """The memory the device may fill, in GiB: a CUDA card's total; on an Apple GPU the share of the
    machine's unified memory Metal recommends for it (torch 2.5 and newer); None on the CPU."""
    import torch

    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    elif device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        memory = torch.mps.recommended_max_memory()
    else:
        return None
    return round(memory / 2**30, 1)
