"""SDXL (id sdxl): SD's DDPM UNet at 1024 px, with two CLIP text encoders and size conditioning.

- Recognised by a second text encoder in model_index.json, or an XL pipeline class.
- Captions: each encoder's penultimate hidden layer (no final layer norm), concatenated
  feature-wise, plus the second encoder's pooled projection, as diffusers'
  StableDiffusionXLPipeline.encode_prompt computes them (tests compare the two).
- Size conditioning: each image's original size, crop corner and bucket (its "time ids") go with its
  pooled text into the UNet's added conditions (training/data/loader.py builds them).
- Objective, LoRA targets and layout: SD's (training/families/sd.py); kohya names the two encoders
  te1 and te2.
- The guide: its SDXL hardware row; trained in bf16; captions over 75 tokens in 75-token chunks
  (max_token_length 150/225), as training/prompts.py splits them for SD.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from training.families.base import HardwareRow
from training.families.sd import StableDiffusion

if TYPE_CHECKING:
    from training.config import TrainingConfig
    from training.models.builtin import TinySpec
    from training.models.loading import LoadedModel

# The guide's "Required Hardware" and "Training Time" row. UNet 2.6B; CLIP-L + bigG + VAE.
SDXL_HARDWARE = HardwareRow(1024, 12, 16, (30, 60), denoiser_gb=5.1, encoders_gb=1.8)
# Names of SDXL models: sdxl, sd_xl, xl as a word.
SDXL_NAME = re.compile(r"(^|[^a-z])(sd)?xl([^a-z]|$)")


class StableDiffusionXL(StableDiffusion):
    pipeline_options: ClassVar[Mapping] = {}
    conditions_on_image_size = True
    text_encoders = ("text_encoder", "text_encoder_2")
    pooled_text = True  # the second encoder's projection, for the text_time embedding
    plan_precision = "bf16"
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"

    def __init__(self):
        super().__init__(v2=False)
        self.id, self.described, self.name = "sdxl", "an SDXL", "SDXL"
        self.hardware = SDXL_HARDWARE
        # playground-v2-5 is SDXL's architecture; loading refuses it for its EDM objective (check_loaded).
        self.checkpoint_types = ("xl_base", "playground-v2-5")

    def named_by(self, name: str) -> bool:
        return SDXL_NAME.search(name) is not None

    def conflicts(self, config: TrainingConfig) -> tuple[list[str], list[str]]:
        """SD's, after SDXL's own: clip_skip."""
        warnings: list[str] = []
        if config.clip_skip != 1:
            warnings.append(
                f"clip_skip {config.clip_skip} has no effect on SDXL: it is conditioned on both encoders' "
                "penultimate layers as it was trained"
            )
        sd_errors, sd_warnings = super().conflicts(config)
        return sd_errors, warnings + sd_warnings

    def recognises(self, index: Mapping, folder: Path) -> bool:
        return "transformer" not in index and ("text_encoder_2" in index or "XL" in str(index.get("_class_name", "")))

    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def loaded_id(self, pipeline) -> str:
        return self.id

    def encode_text(self, model: LoadedModel, prompts: list[str], *, max_token_length: int, clip_skip: int):
        """Each encoder's penultimate states over the caption's 75-token chunks, joined as SD joins them,
        and the second encoder's pooled embedding of the first chunk (kohya's get_hidden_states_sdxl)."""
        import torch

        from training.prompts import TextConditioning, chunk_ids, join_chunks

        states, pooled = [], None
        for tokenizer, encoder in ((model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)):
            chunks = chunk_ids(tokenizer, prompts, max_token_length=max_token_length, device=encoder.device)
            outputs = [encoder(ids, output_hidden_states=True) for ids in chunks]
            states.append(join_chunks([output.hidden_states[-2] for output in outputs]))
            pooled = outputs[0][0]  # the last encoder's projected text embedding, of the first chunk
        return TextConditioning(torch.cat(states, dim=-1), pooled)

    def base_model_version(self, model: LoadedModel) -> str:
        return "sdxl_base_v1-0"

    def modelspec_architecture(self, model: LoadedModel) -> str:
        return "stable-diffusion-xl-v1-base"

    def tiny_pipeline(self, spec: TinySpec):
        """SD's tiny UNet as SDXL builds its own: two text encoders (the second with a projection, whose
        pooled output and the size/crop time ids feed the UNet's `text_time` embedding), cross-attention
        over both encoders' states (32 + 32), SDXL's VAE scaling factor and an Euler scheduler."""
        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from training.models.builtin import byte_level_clip_tokenizer, tiny_clip_config, tiny_vae

        tokenizer = byte_level_clip_tokenizer()
        text_config = tiny_clip_config(tokenizer, hidden_act="gelu")
        time_embed_dim = 8  # per time id; SDXL has 6 ids (original size, crop top-left, target size)
        torch.manual_seed(spec.seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # SDXL: no attention at the first level
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,  # both text encoders' states, concatenated
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=text_config.projection_dim + 6 * time_embed_dim,
        )
        # SDXL's scaling factor; its VAE overflows in fp16, so diffusers decodes it in fp32.
        vae = tiny_vae(spec.seed + 1, scaling_factor=0.13025, force_upcast=True)
        torch.manual_seed(spec.seed + 2)
        text_encoder = CLIPTextModel(text_config)
        torch.manual_seed(spec.seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(text_config)
        scheduler = EulerDiscreteScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
            prediction_type=spec.prediction_type,
        )
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )


SDXL = StableDiffusionXL()
