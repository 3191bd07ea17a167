"""Where the base model's parts live and in what precision while training: the one table of what each
device runs for each mixed_precision (autocast, frozen storage type, gradient scaling), and the low_vram
memory savers (text encoders on the CPU, the VAE off the GPU between uses, gradient checkpointing). The
storage types the frozen weights are loaded in are models/loading.py's frozen_dtypes, from the same table."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from training.data.captions import control_prompt, rendered_prompts
from training.prompts import release_text_encoders

if TYPE_CHECKING:
    from training.config import TrainingConfig
    from training.models.loading import LoadedModel

log = logging.getLogger("training")

HALF_TYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PrecisionSupport:
    """What a mixed_precision does on one device type: autocast in it, with the frozen weights stored in
    it (models/loading.py frozen_dtypes), and whether the loss is scaled for fp16 gradients."""

    grad_scaler: bool
    why: str


# The one decision of what runs where; "no", and a device type not listed (LORA_TRAIN_DEVICE=xpu, say),
# run in fp32 with the request recorded only. Every row needs torch's autocast for the device (MPS: torch
# 2.5); LoRA weights train in fp32 everywhere.
# Step times, tiny SD 1.5 UNet, 64 px, batch 4, rank 4, on this project's 2-core AVX2 CPU (no bf16 units;
# torch 2.13; three runs, medians of 20 steps): fp32 84-112 ms, fp16 autocast 212-230 ms, bf16 autocast
# 1.4-2.0 s. mixed_precision defaults to "no", so a CPU run that asks for nothing stays fp32, as fast as before.
PRECISIONS: dict[tuple[str, str], PrecisionSupport] = {
    ("cuda", "fp16"): PrecisionSupport(
        True, "fp16's 5-bit exponent flushes small gradients to zero, so the loss is scaled (GradScaler)"
    ),
    ("cuda", "bf16"): PrecisionSupport(
        False, "bf16 keeps fp32's 8-bit exponent: no loss scaling (native on Ampere, compute capability 8.0, and newer)"
    ),
    ("mps", "fp16"): PrecisionSupport(
        False,
        "unscaled: GradScaler reached MPS in torch 2.8 and zeroed fp16 gradients until 2026 (pytorch#184286), so "
        "small gradients may flush to zero; bf16 (macOS 14 and newer) does not need scaling",
    ),
    ("mps", "bf16"): PrecisionSupport(False, "bf16 keeps fp32's exponent: no loss scaling (macOS 14 and newer)"),
    ("cpu", "fp16"): PrecisionSupport(
        True,
        "the same fp16 gradients as on CUDA, so the loss is scaled (torch's GradScaler runs on the CPU); "
        "slower than fp32 on most CPUs (2-2.5x on an AVX2 CPU): use 'no' for speed",
    ),
    ("cpu", "bf16"): PrecisionSupport(
        False,
        "bf16 keeps fp32's exponent: no loss scaling; fast only on CPUs with bf16 units (AMX, AVX512-BF16), "
        "15-20x slower than fp32 elsewhere: use 'no' for speed",
    ),
}


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 is a fast choice on the device: a CUDA card from Ampere on (compute capability 8.0; a T4 or a
    GeForce 10xx/20xx has no bf16 units) or an Apple GPU; not a CPU, where it is mostly emulated (PRECISIONS)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "mps"


def half_dtype(mixed_precision: str, device_type: str) -> torch.dtype | None:
    """The type autocast computes in and frozen weights are stored in, or None: fp32 (PRECISIONS)."""
    if (device_type, mixed_precision) not in PRECISIONS or not torch.amp.is_autocast_available(device_type):
        return None
    return HALF_TYPES[mixed_precision]


def text_encoders_stay_on_cpu(config: TrainingConfig, device: torch.device) -> bool:
    """low_vram on CUDA, with captions that encode to fixed states: the text encoders never go to the GPU
    (FLUX's T5 alone is 9.5 GB in bf16, as much as the 8-bit transformer); they encode every caption and
    test prompt on the CPU, once per caption and per sample set."""
    return config.low_vram and device.type == "cuda" and config.static_text


class Placement:
    """fp16/bf16 autocast where PRECISIONS has the device, with the frozen weights stored in that type and
    the loss scaled where its row says; LoRA weights stay fp32. Elsewhere the run is fp32."""

    def __init__(self, base: LoadedModel, config: TrainingConfig, device: torch.device):
        self.base, self.config, self.device = base, config, device
        requested = config.mixed_precision
        self.autocast_dtype = half_dtype(requested, device.type)
        support = PRECISIONS[(device.type, requested)] if self.autocast_dtype else None
        if support:
            log.info("mixed_precision %s on %s: %s", requested, device.type, support.why)
        elif requested in HALF_TYPES:
            log.info("mixed_precision %s is recorded only: training on %s runs in fp32", requested, device.type)
        self.weight_dtype = self.autocast_dtype or torch.float32
        self.label = requested if support else "fp32"
        self.scaler = torch.amp.GradScaler(device.type, enabled=bool(support and support.grad_scaler))
        # The frozen weights are already stored in their types and places: load_base_model reads them so
        # (models/loading.py frozen_dtypes).

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders train_text_encoder trains: the family's that a LoRA may adapt (SD 3.5's CLIPs,
        not its T5, whose dropout train mode would switch on)."""
        encoders = self.base.family_rules.text_encoders
        return [model for prefix, model in self.base.lora_models.items() if prefix in encoders]

    def autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        )

    def enable_memory_savers(self) -> None:
        if self.config.gradient_checkpointing:
            self.base.denoiser.enable_gradient_checkpointing()
            if self.config.train_text_encoder:
                for encoder in self.text_encoders:
                    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.config.low_vram and self.device.type != "cuda":
            # Apple GPUs share the machine's memory: moving a model off one frees nothing.
            log.info(
                "low_vram is recorded only: it moves encoders out of a CUDA card's memory, and this run is on %s",
                self.device.type,
            )

    def release_text_encoders(self) -> None:
        """After caching, for a family that releases its text encoders (ModelFamily.releases_text_encoders) when
        every caption is cached (static text): the sample, control and empty negative prompts encoded once, then
        the encoders dropped (training/prompts.py release_text_encoders)."""
        config = self.config
        if not (self.base.family_rules.releases_text_encoders and config.static_text):
            return
        control = control_prompt(config)
        prompts = rendered_prompts(config) + ([control] if control else []) + [""]
        release_text_encoders(self.base, prompts, max_token_length=config.max_token_length, clip_skip=config.clip_skip)
        log.info("text encoders released after caching: %d prompt(s) kept encoded", len(self.base.encoded_prompts))

    def offload_encoders(self) -> None:
        """low_vram on CUDA: after caching, the VAE waits on the CPU (the text encoders never left it,
        unless they are trained or re-encode shuffled captions every step)."""
        if self.config.low_vram and self.device.type == "cuda":
            if self.config.cache_latents:
                self.base.vae.to("cpu")
            torch.cuda.empty_cache()

    @contextmanager
    def encoders_on_device(self) -> Iterator[None]:
        """Bring the offloaded VAE back to decode samples, and send it away again."""
        if self.config.low_vram and self.device.type == "cuda":
            self.base.vae.to(self.device)
        try:
            yield
        finally:
            self.offload_encoders()


def device_rng_state(device: torch.device) -> dict:
    """An accelerator's random state, for a checkpoint (the CPU's is torch_rng): LoRA dropout and the
    data order on it draw from it, so a resume is exact only with it. Keyed as checkpoints before MPS
    support stored CUDA's."""
    if device.type == "cuda":
        return {"cuda_rng": torch.cuda.get_rng_state_all()}
    if device.type == "mps":
        return {"mps_rng": torch.mps.get_rng_state()}
    return {}


def restore_device_rng(device: torch.device, state: dict) -> None:
    if device.type == "cuda" and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    elif device.type == "mps" and state.get("mps_rng") is not None:
        torch.mps.set_rng_state(state["mps_rng"])
