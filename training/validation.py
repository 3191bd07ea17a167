"""Held-out validation: a loss over images the LoRA never trains on, scored the same way every time.

The images come from the dataset's `validation` folder or, without one, a `validation_split`
share of the training images picked with the run's seed. Each image is encoded once (centre
crop, no flip, the VAE's mean rather than a sample) with its caption as written (no dropout or
shuffle), and scored at five fixed noise levels (objectives.VALIDATION_LEVELS: timesteps of the
DDPM schedule, or sigmas of FLUX's flow) with noise drawn from a generator seeded by the run's
seed and the image's position. So two scorings of the same weights give the same number, and a
change of the number is a change of the LoRA. No min-SNR weighting: the figure is the plain
denoising error, comparable across runs with different loss settings. In a data-parallel run each
process scores its share of the images and the totals are summed, so the number is the single
process's (up to the order of the float additions).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from training.data.buckets import assign_bucket, make_buckets, square_bucket
from training.data.images import covering_size, crop_top_left, load_pixels
from training.data.loader import Batch
from training.distributed import Distributed
from training.objectives import VALIDATION_LEVELS
from training.prompts import TextConditioning, encode_text

if TYPE_CHECKING:
    from training.config import TrainingConfig
    from training.data.dataset import ImageRecord
    from training.models.loading import LoadedModel


class ValidationSet:
    def __init__(
        self, records: list[ImageRecord], base: LoadedModel, config: TrainingConfig, dist: Distributed | None = None
    ):
        self.records = records
        self._base = base
        self._config = config
        self._dist = dist or Distributed.single()
        self._positions = range(*self._dist.shard(len(records)))  # the images this process scores
        self._items: list[Batch] = []  # per image: its latent and conditioning, once per noise level
        self._objective = base.family_rules.objective(base, config)

    def prepare(self) -> None:
        """Encode every image and caption once (the VAE and text encoder must be on the device); with
        train_text_encoder the captions are encoded again at each scoring, through the current LoRA."""
        base, config = self._base, self._config
        step = base.bucket_step
        buckets = make_buckets(config.resolution, step)
        vae = base.vae
        with torch.no_grad():
            for record in (self.records[p] for p in self._positions):
                if config.enable_bucketing:
                    bucket = assign_bucket(record.size, buckets, step)
                else:
                    bucket = square_bucket(config.resolution, step)
                pixels = load_pixels(record.path, bucket, random_crop=False, flip=False, rng=None)
                latent = base.family_rules.encode_latents(vae, pixels[None].to(vae.device, vae.dtype), None)
                text = encode_text(
                    base, [record.caption], max_token_length=config.max_token_length, clip_skip=config.clip_skip
                )
                count = len(VALIDATION_LEVELS)
                time_ids = None
                if base.family_rules.conditions_on_image_size:  # SDXL: the centre crop of the resized image, as trained
                    left, top = crop_top_left(covering_size(record.size, bucket), bucket, random_crop=False, rng=None)
                    row = [record.size[1], record.size[0], top, left, bucket[1], bucket[0]]
                    time_ids = torch.tensor([row] * count, dtype=torch.float32)
                self._items.append(
                    Batch(
                        latents=latent.expand(count, -1, -1, -1),
                        conditioning=text.states.expand(count, -1, -1),
                        loss_weights=torch.ones(count),
                        files=[str(record.path)],
                        time_ids=time_ids,
                        **_repeated(text, count),
                    )
                )

    def loss(self, weight_dtype: torch.dtype, autocast) -> float:
        """The mean denoising error over every image and VALIDATION_LEVELS, in eval mode (no LoRA
        dropout); the RNG streams of training are not touched."""
        base, objective = self._base, self._objective
        device = base.device
        levels = objective.validation_levels(device)
        models = list(base.lora_models.values())
        was_training = [model.training for model in models]
        for model in models:
            model.eval()
        total = 0.0
        try:
            with torch.no_grad():
                for position, item in zip(self._positions, self._items):
                    if self._config.train_text_encoder:  # its LoRA moves: encode the caption as it is now
                        item = self._with_current_text(item, position)
                    generator = torch.Generator().manual_seed(self._config.seed * 1000 + position)
                    latents = item.latents.to(device)
                    noise = torch.randn(latents.shape, generator=generator).to(device)
                    noisy, target = objective.noisy_and_target(latents, noise, levels)
                    with autocast():
                        prediction = objective.predict(noisy, levels, item, weight_dtype)
                    total += F.mse_loss(prediction.float(), target.float()).item()
        finally:
            for model, mode in zip(models, was_training):
                model.train(mode)
        if not self._dist.multi:
            return total / len(self._items)
        total, count = self._dist.sum_values([total, float(len(self._items))])
        return total / count

    def _with_current_text(self, item: Batch, position: int) -> Batch:
        record, count = self.records[position], len(VALIDATION_LEVELS)
        config = self._config
        text = encode_text(
            self._base, [record.caption], max_token_length=config.max_token_length, clip_skip=config.clip_skip
        )
        return replace(item, conditioning=text.states.expand(count, -1, -1), **_repeated(text, count))


def _repeated(text: TextConditioning, count: int) -> dict:
    """A Batch's pooled vectors and text mask: one caption's, once per noise level."""
    return {
        "pooled": None if text.pooled is None else text.pooled.expand(count, -1),
        "text_mask": None if text.mask is None else text.mask.expand(count, -1),
    }
