"""Where the base model's parts live and in what precision: mixed precision on CUDA, and the
low_vram memory savers (text encoders on the CPU, the VAE off the GPU between uses, gradient
checkpointing)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from training.config import TrainingConfig
    from training.models.loading import BaseModel

log = logging.getLogger("training")


TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # pipeline component names (FLUX: CLIP and T5)


def frozen_dtypes(
    mixed_precision: str, device_type: str, family: str | None, *, text_on_cpu: bool = False
) -> dict[str, torch.dtype]:
    """The storage type of the frozen weights by pipeline component ("default": the rest), as
    diffusers' from_pretrained takes it: the mixed-precision type on CUDA, fp32 elsewhere. Under fp16
    the VAE stays fp32 (SD and SDXL VAEs overflow in fp16; SDXL's sets force_upcast), and so does FLUX's
    T5 (its activations overflow too); both encode once anyway, and so do text encoders kept on the CPU
    (`text_on_cpu`), which has no fast fp16. Loading FLUX straight in bf16 halves what its fp32 load
    would put on the GPU (12 B + 4.7 B parameters: ~34 GB instead of ~67 GB)."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision) if device_type == "cuda" else None
    if dtype is None:
        return {"default": torch.float32}
    dtypes = {"default": dtype}
    if dtype == torch.float16:
        dtypes["vae"] = torch.float32
        if family == "flux":
            dtypes["text_encoder_2"] = torch.float32
        if text_on_cpu:
            dtypes.update(dict.fromkeys(TEXT_ENCODERS, torch.float32))
    return dtypes


def text_encoders_stay_on_cpu(config: TrainingConfig, device: torch.device) -> bool:
    """low_vram on CUDA, with captions that encode to fixed states: the text encoders never go to the GPU
    (FLUX's T5 alone is 9.5 GB in bf16, as much as the 8-bit transformer); they encode every caption and
    test prompt on the CPU, once per caption and per sample set."""
    return config.low_vram and device.type == "cuda" and config.static_text


class Placement:
    """fp16/bf16 autocast on CUDA with the frozen weights stored in that type; LoRA weights stay fp32.
    On CPU everything runs in fp32 (mixed_precision and low_vram are recorded only)."""

    def __init__(self, base: BaseModel, config: TrainingConfig, device: torch.device):
        self.base, self.config, self.device = base, config, device
        requested = config.mixed_precision
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(requested)
        if device.type != "cuda" and self.autocast_dtype is not None:
            log.info("mixed_precision %s is recorded only: training on %s runs in fp32", requested, device.type)
            self.autocast_dtype = None
        self.weight_dtype = self.autocast_dtype or torch.float32
        self.label = requested if self.autocast_dtype else "fp32"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)
        # The frozen weights are already stored in frozen_dtypes' types and places: load_base_model reads them so.

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.base.text_encoder, self.base.text_encoder_2) if m is not None]

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
            log.info(
                "low_vram is recorded only: it moves encoders off the GPU, and this run is on %s", self.device.type
            )

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
