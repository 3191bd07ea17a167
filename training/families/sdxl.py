"""SDXL (id sdxl): SD's DDPM UNet at 1024 px, with two CLIP text encoders and size conditioning.

- Recognised by a second text encoder in model_index.json, or an XL pipeline class.
- Captions: each encoder's penultimate hidden layer (no final layer norm), concatenated
  feature-wise, plus the second encoder's pooled projection, as diffusers'
  StableDiffusionXLPipeline.encode_prompt computes them (tests compare the two).
- Size conditioning: each image's original size, crop corner and bucket (its "time ids") go with its
  pooled text into the UNet's added conditions (training/data/loader.py builds them).
- Objective, LoRA targets and layout: SD's (training/families/sd.py); kohya names the two encoders
  te1 and te2.
- The guide: its SDXL hardware row; trained in bf16; captions of one CLIP chunk (75 tokens) so far.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from training.families.base import HardwareRow
from training.families.sd import StableDiffusion
from training.guide import CAPTION_TOKENS

if TYPE_CHECKING:
    from training.config import TrainingConfig
    from training.models.loading import LoadedModel

# The guide's "Required Hardware" and "Training Time" row. UNet 2.6B; CLIP-L + bigG + VAE.
SDXL_HARDWARE = HardwareRow(1024, 12, 16, (30, 60), denoiser_gb=5.1, encoders_gb=1.8)
# Names of SDXL models: sdxl, sd_xl, xl as a word.
SDXL_NAME = re.compile(r"(^|[^a-z])(sd)?xl([^a-z]|$)")


class StableDiffusionXL(StableDiffusion):
    pipeline_options: ClassVar[Mapping] = {}
    conditions_on_image_size = True
    plan_precision = "bf16"

    def __init__(self):
        super().__init__(v2=False)
        self.id, self.described, self.name = "sdxl", "an SDXL", "SDXL"
        self.hardware = SDXL_HARDWARE
        # playground-v2-5 is SDXL's architecture; loading refuses it for its EDM objective (check_loaded).
        self.checkpoint_types = ("xl_base", "playground-v2-5")

    def named_by(self, name: str) -> bool:
        return SDXL_NAME.search(name) is not None

    def conflicts(self, config: TrainingConfig) -> tuple[list[str], list[str]]:
        """SD's, after SDXL's own: long captions (one CLIP chunk is encoded so far) and clip_skip."""
        errors: list[str] = []
        warnings: list[str] = []
        if config.max_token_length > CAPTION_TOKENS:
            errors.append(
                f"for SDXL, this trainer encodes captions of up to {CAPTION_TOKENS} tokens so far: set "
                f"max_token_length to {CAPTION_TOKENS}"
            )
        if config.clip_skip != 1:
            warnings.append(
                f"clip_skip {config.clip_skip} has no effect on SDXL: it is conditioned on both encoders' "
                "penultimate layers as it was trained"
            )
        sd_errors, sd_warnings = super().conflicts(config)
        return errors + sd_errors, warnings + sd_warnings

    def recognises(self, index: Mapping, folder: Path) -> bool:
        return "transformer" not in index and ("text_encoder_2" in index or "XL" in str(index.get("_class_name", "")))

    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def loaded_id(self, pipeline) -> str:
        return self.id

    def encode_text(self, model: LoadedModel, prompts: list[str], *, max_token_length: int, clip_skip: int):
        import torch

        from training.prompts import TextConditioning

        states, pooled = [], None
        for tokenizer, encoder in ((model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)):
            ids = tokenizer(
                prompts,
                padding="max_length",
                truncation=True,
                max_length=tokenizer.model_max_length,
                return_tensors="pt",
            ).input_ids.to(encoder.device)
            output = encoder(ids, output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's projected text embedding
        return TextConditioning(torch.cat(states, dim=-1), pooled)

    def base_model_version(self, model: LoadedModel) -> str:
        return "sdxl_base_v1-0"

    def modelspec_architecture(self, model: LoadedModel) -> str:
        return "stable-diffusion-xl-v1-base"


SDXL = StableDiffusionXL()
