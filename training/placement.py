"""Where the base model's parts live and in what precision while training: autocast on CUDA, and the
low_vram memory savers (text encoders on the CPU, the VAE off the GPU between uses, gradient
checkpointing). The storage types the frozen weights are loaded in are models/loading.py's frozen_dtypes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from training.config import TrainingConfig
    from training.models.loading import LoadedModel

log = logging.getLogger("training")


def text_encoders_stay_on_cpu(config: TrainingConfig, device: torch.device) -> bool:
    """low_vram on CUDA, with captions that encode to fixed states: the text encoders never go to the GPU
    (FLUX's T5 alone is 9.5 GB in bf16, as much as the 8-bit transformer); they encode every caption and
    test prompt on the CPU, once per caption and per sample set."""
    return config.low_vram and device.type == "cuda" and config.static_text


class Placement:
    """fp16/bf16 autocast on CUDA with the frozen weights stored in that type; LoRA weights stay fp32.
    On CPU everything runs in fp32 (mixed_precision and low_vram are recorded only)."""

    def __init__(self, base: LoadedModel, config: TrainingConfig, device: torch.device):
        self.base, self.config, self.device = base, config, device
        requested = config.mixed_precision
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(requested)
        if device.type != "cuda" and self.autocast_dtype is not None:
            log.info("mixed_precision %s is recorded only: training on %s runs in fp32", requested, device.type)
            self.autocast_dtype = None
        self.weight_dtype = self.autocast_dtype or torch.float32
        self.label = requested if self.autocast_dtype else "fp32"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)
        # The frozen weights are already stored in their types and places: load_base_model reads them so
        # (models/loading.py frozen_dtypes).

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
