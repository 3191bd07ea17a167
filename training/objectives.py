"""What the denoiser learns to predict, and at which noise levels: one objective per model family.

- DDPM (SD 1.x/2.x, SDXL): latents are noised at a random timestep of the scheduler's 1000 by
  `add_noise`; the UNet predicts the noise (epsilon) or the velocity (v-prediction).
- Rectified flow (FLUX): x_sigma = (1 - sigma) * x0 + sigma * noise for a noise level sigma in
  (0, 1); the transformer predicts the velocity noise - x0 from latents packed in 2x2 patches, with
  position ids for image and text tokens and, for guidance-distilled models, a guidance input.

Both give the trainer and the validation set the same four operations, so the training step and
the held-out score read the same for every family.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from training.config import TrainingConfig
    from training.data.loader import Batch
    from training.models.loading import BaseModel

# Held-out images are scored at these five noise levels, in thousandths of the schedule: the error
# at each differs by an order of magnitude, so they are averaged per image rather than drawn at
# random, which would swamp a LoRA's effect in noise.
VALIDATION_LEVELS = (100, 300, 500, 700, 900)
# FLUX.1-dev and Flex.1 are guidance-distilled: LoRAs are trained with the guidance input at 1
# (kohya's and ai-toolkit's setting), and rendered at 3-4.
TRAINING_GUIDANCE = 1.0


class DdpmObjective:
    """Epsilon or v-prediction over the model's discrete DDPM timesteps."""

    def __init__(self, base: BaseModel):
        self.base = base
        self.scheduler = base.noise_scheduler

    def sample_levels(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A uniformly drawn timestep per image."""
        return torch.randint(
            0,
            self.scheduler.config.num_train_timesteps,
            (latents.shape[0],),
            generator=generator,
            device=latents.device,
        )

    def validation_levels(self, device: torch.device) -> torch.Tensor:
        total = self.scheduler.config.num_train_timesteps
        return torch.tensor([level * total // 1000 for level in VALIDATION_LEVELS], device=device)

    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.base.prediction_type == "epsilon":
            return noisy, noise
        return noisy, self.scheduler.get_velocity(latents, noise, timesteps)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
        unet = self.base.denoiser
        added = batch.added_conditions(dtype)  # SDXL's pooled text and size/crop ids
        return unet(
            noisy.to(dtype),
            timesteps,
            batch.conditioning.to(self.base.device, dtype),
            added_cond_kwargs=None if added is None else {k: v.to(self.base.device) for k, v in added.items()},
        ).sample

    def min_snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al. 2023): down-weight easy, low-noise timesteps."""
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, timesteps)
        clipped = torch.clamp(snr, max=gamma)
        return clipped / (snr + 1) if self.base.prediction_type == "v_prediction" else clipped / snr


class FlowMatchingObjective:
    """Rectified flow with the noise level drawn by `timestep_sampling`:
    uniform in (0, 1); logit_normal, sigmoid of a standard normal (most draws mid-range); or shift, the
    logit-normal draw moved towards high noise by s*sigma / (1 + (s-1)*sigma), with s = timestep_shift or
    the model scheduler's own shift (FLUX.1-dev's grows with the image's token count: e^0.5 at 256
    tokens, e^1.15 = 3.16 at 4096, i.e. 1024 px)."""

    def __init__(self, base: BaseModel, config: TrainingConfig):
        self.base = base
        self.sampling = config.timestep_sampling
        self.fixed_shift = config.timestep_shift

    def sample_levels(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count, device = latents.shape[0], latents.device
        if self.sampling == "uniform":
            return torch.rand((count,), generator=generator, device=device)
        sigmas = torch.sigmoid(torch.randn((count,), generator=generator, device=device))
        if self.sampling == "logit_normal":
            return sigmas
        shift = self.shift(tokens=(latents.shape[2] // 2) * (latents.shape[3] // 2))
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def shift(self, tokens: int) -> float:
        """The sigma shift for an image of `tokens` packed latent patches."""
        if self.fixed_shift is not None:
            return self.fixed_shift
        config = self.base.noise_scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return float(config.shift)
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return math.exp(mu)

    def validation_levels(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([level / 1000 for level in VALIDATION_LEVELS], device=device)

    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = sigmas.to(latents.dtype).view(-1, 1, 1, 1)
        return (1 - s) * latents + s * noise, noise - latents

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
        from diffusers import FluxPipeline

        transformer, factor = self.base.denoiser, self.base.vae_scale_factor
        device = self.base.device
        count, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy.to(dtype), count, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(count, height // 2, width // 2, device, dtype)
        text = batch.conditioning.to(device, dtype)
        text_ids = torch.zeros(text.shape[1], 3, device=device, dtype=dtype)
        guidance = (
            torch.full((count,), TRAINING_GUIDANCE, device=device, dtype=torch.float32)
            if self.base.guidance_embedded
            else None
        )
        velocity = transformer(
            hidden_states=packed,
            timestep=sigmas.to(dtype),  # FLUX takes sigma in (0, 1) and scales it by 1000 itself
            guidance=guidance,
            pooled_projections=batch.pooled.to(device, dtype),
            encoder_hidden_states=text,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(velocity, height * factor, width * factor, factor)


def objective_for(base: BaseModel, config: TrainingConfig) -> DdpmObjective | FlowMatchingObjective:
    return FlowMatchingObjective(base, config) if base.family == "flux" else DdpmObjective(base)
