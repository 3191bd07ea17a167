"""DreamBooth-style prior preservation: class images generated with the base model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from training.data.dataset import image_files
from training.sampling import guidance_argument, prompt_arguments, render
from training.workspace import atomic_output

if TYPE_CHECKING:
    from training.config import TrainingConfig
    from training.models.loading import LoadedModel
    from training.placement import Placement

log = logging.getLogger("training")
GENERATION_BATCH = 4
GENERATION_STEPS = 25  # enough for recognisable class images at SD scale; each is a one-off cost


def ensure_class_images(
    base: LoadedModel, placement: Placement, config: TrainingConfig, class_dir: Path, given: list[Path]
) -> list[Path]:
    """Return `num_class_images` class images: `given` (the dataset's class/ folder, read only) first, then those
    in `class_dir`, generating the missing ones there.

    Must run before the LoRA is attached: class images show what the base model makes of
    `class_prompt`, which is what prior preservation keeps.
    """
    found = given + (image_files(class_dir, recursive=True) if class_dir.is_dir() else [])
    missing = config.num_class_images - len(found)
    if missing > 0:
        log.info("generating %d class image(s) of %r into %s", missing, config.class_prompt, class_dir)
        base.denoiser.eval()
        number = len(found)
        with torch.no_grad():
            while missing > 0:
                count = min(GENERATION_BATCH, missing)
                generator = torch.Generator(base.device).manual_seed(config.seed + number)
                images = render(
                    base,
                    placement,
                    **prompt_arguments(base, config, [config.class_prompt] * count),
                    height=config.resolution,
                    width=config.resolution,
                    num_inference_steps=GENERATION_STEPS,
                    generator=generator,
                    **guidance_argument(base, config.sample_guidance_scale),
                )
                for image in images:
                    while (path := class_dir / f"class_{number:05d}.png").exists():
                        number += 1  # never overwrite a class image the user put there
                    with atomic_output(path) as tmp:
                        image.save(tmp, format="PNG")
                    found.append(path)
                    number += 1
                missing -= count
    return found[: config.num_class_images]
