"""SDXL (id sdxl): SD's DDPM UNet at 1024 px, with two CLIP text encoders and size conditioning.

- Recognised by a second text encoder in model_index.json, or an XL pipeline class.
- Captions: each encoder's penultimate hidden layer (no final layer norm), concatenated
  feature-wise, plus the second encoder's pooled projection, as diffusers'
  StableDiffusionXLPipeline.encode_prompt computes them (tests compare the two).
- Size conditioning: each image's original size, crop corner and bucket (its "time ids") go with its
  pooled text into the UNet's added conditions (training/data/loader.py builds them).
- Objective, LoRA targets and layout: SD's (training/families/sd.py); kohya names the two encoders
  te1 and te2.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from training.families.sd import StableDiffusion

if TYPE_CHECKING:
    from training.models.loading import LoadedModel


class StableDiffusionXL(StableDiffusion):
    pipeline_options: ClassVar[Mapping] = {}
    conditions_on_image_size = True

    def __init__(self):
        super().__init__(v2=False)
        self.id, self.described = "sdxl", "an SDXL"
        # playground-v2-5 is SDXL's architecture; loading refuses it for its EDM objective (check_loaded).
        self.checkpoint_types = ("xl_base", "playground-v2-5")

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
