"""What the denoiser learns to predict, and at which noise levels: one objective per model family.

- DDPM (SD 1.x/2.x, SDXL; training/families/sd.py DdpmObjective): latents are noised at a random
  timestep of the scheduler's 1000; the UNet predicts the noise (epsilon) or the velocity (v-prediction).
- Rectified flow (FLUX and the other transformer families; training/families/flow.py RectifiedFlow):
  x_sigma = (1 - sigma) * x0 + sigma * noise for a noise level sigma in (0, 1); the transformer predicts the
  velocity noise - x0.

Both give the trainer and the validation set the same four operations below, so the training step
and the held-out score read the same for every family; a model's is `model.family_rules.objective`.
DDPM's also weights the loss by min-SNR-gamma (`min_snr_weights`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from training.data.loader import Batch

# Held-out images are scored at these five noise levels, in thousandths of the schedule: the error
# at each differs by an order of magnitude, so they are averaged per image rather than drawn at
# random, which would swamp a LoRA's effect in noise.
VALIDATION_LEVELS = (100, 300, 500, 700, 900)


class Objective(Protocol):
    def sample_levels(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random noise level (timestep or sigma) per image of the batch."""

    def validation_levels(self, device: torch.device) -> torch.Tensor:
        """VALIDATION_LEVELS in the objective's own units."""

    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noised latents and what the denoiser should predict from them."""

    def predict(self, noisy: torch.Tensor, levels: torch.Tensor, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
        """The denoiser's prediction, in the target's shape."""
