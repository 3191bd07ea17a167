"""Stable Diffusion 1.x and 2.x (ids sd1, sd2): a UNet trained with DDPM noise, one CLIP text
encoder, and the DDPM objective SDXL shares.

- Recognised by a model_index.json without a transformer or second text encoder; the UNet's config
  tells SD 2.x (linear projections, 1024-wide cross-attention) from SD 1.x.
- Captions: CLIP with clip_skip and 75-token chunks (training/prompts.py's encode_prompts).
- Objective: latents noised at a random timestep of the scheduler's 1000 by `add_noise`; the UNet
  predicts the noise (epsilon) or the velocity (v-prediction, SD 2.x 768-v).
- LoRA: every attention projection of the UNet, and with train_text_encoder the CLIP encoder's.
- The guide: SD 1.5's hardware row (SD 2.x's interpolated), trained in fp16 as its examples are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from training.families.base import HardwareRow, ModelFamily, read_config, vae_factor

if TYPE_CHECKING:
    import torch

    from training.config import TrainingConfig
    from training.data.loader import Batch
    from training.models.builtin import TinySpec
    from training.models.loading import LoadedModel
    from training.models.source import ModelSource

UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # every attention projection
# The guide's "Required Hardware" and "Training Time" rows. SD 1.5: UNet 860M; CLIP-L 123M + VAE 84M = 207M
# (tests/test_full_size.py counts them on the meta device).
SD15_HARDWARE = HardwareRow(512, 6, 8, (15, 30), denoiser_gb=1.7, encoders_gb=0.4)
# The guide has no SD 2.x row: its numbers are interpolated between SD 1.5 and SDXL by pixels (768^2 lies
# 42% of the way from 512^2 to 1024^2). UNet 866M; OpenCLIP-H's text tower as SD 2.x ships it (23 of its
# 24 layers) 340M + VAE 84M = 424M.
SD2_HARDWARE = HardwareRow(
    768,
    8.5,
    11.3,
    (21, 42),
    denoiser_gb=1.7,
    encoders_gb=0.8,
    estimated="interpolated between the guide's SD 1.5 and SDXL rows, it has none for SD 2.x",
)
# Names of SD 2.x models: stable-diffusion-2(-1), sd2, sd-2, 2.0, 2-1.
SD2_NAME = re.compile(r"stable-diffusion-2|(^|[^a-z])sd-?2|2[-.][01]([^0-9]|$)")


class StableDiffusion(ModelFamily):
    """SD 1.x or 2.x (`v2`): one instance each, sharing everything but the tags."""

    denoiser_prefix = "unet"
    denoiser_class = "UNet2DConditionModel"
    lora_target_modules = UNET_TARGET_MODULES
    pipeline_options: ClassVar[Mapping] = {"safety_checker": None, "requires_safety_checker": False}
    plan_precision = "fp16"

    def __init__(self, *, v2: bool):
        self.v2 = v2
        self.id = "sd2" if v2 else "sd1"
        self.described = f"a Stable Diffusion {2 if v2 else 1}.x"
        self.name = "SD 2.x" if v2 else "SD 1.5"
        self.hardware = SD2_HARDWARE if v2 else SD15_HARDWARE
        self.checkpoint_types = ("v2",) if v2 else ("v1",)
        self.sd_v2 = v2

    def named_by(self, name: str) -> bool:
        """SD 2.x by name: the 768 px v-prediction models; the 2.x "base" models are 512 px, as SD 1.5 (the
        default guess)."""
        return self.v2 and SD2_NAME.search(name) is not None and "base" not in name

    def conflicts(self, config: TrainingConfig) -> tuple[list[str], list[str]]:
        """A DDPM UNet: FLUX's noise-level options are ignored, and 8-bit weights refused."""
        errors: list[str] = []
        warnings = [
            f"{option} is for flow-matching (FLUX) models; this {self.id} model ignores it"
            for option in ("timestep_sampling", "timestep_shift")
            if option in config.model_fields_set
        ]
        if config.quantize_base != "none":
            errors.append(
                "quantize_base 8bit is for FLUX's 12 B transformer; an SD/SDXL UNet fits without it: set "
                "quantize_base to none"
            )
        return errors, warnings

    def recognises(self, index: Mapping, folder: Path) -> bool:
        if "transformer" in index or "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
            return False
        try:
            unet = read_config(folder / "unet" / "config.json")
        except (OSError, ValueError):
            return False
        return bool(unet.get("use_linear_projection") or unet.get("cross_attention_dim") == 1024) == self.v2

    def geometry(self, vae: Mapping, denoiser: Mapping) -> tuple[int, int] | None:
        """UNet sample_size x VAE factor, and VAE factor x UNet downsampling (64 for SD 1.5: 8 x 2^3)."""
        factor = vae_factor(vae)
        sample_size, unet_levels = denoiser["sample_size"], denoiser["block_out_channels"]
        if factor is None or not isinstance(sample_size, int) or not unet_levels:
            return None
        return sample_size * factor, factor * 2 ** (len(unet_levels) - 1)

    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def check_loaded(self, pipeline, source: ModelSource) -> str | None:
        """Playground v2.5: an SDXL architecture trained with EDM noise and normalised latents; replacing its
        scheduler by DDPM and skipping the normalisation would train it on the wrong objective."""
        edm = type(pipeline.scheduler).__name__.startswith("EDM")
        if getattr(pipeline.vae.config, "latents_mean", None) is None and not edm:
            return None
        return (
            f"{source.path} is an SDXL-architecture model trained with EDM noise and normalised latents (such as "
            "Playground v2.5); this trainer trains DDPM-trained SD 1.x/2.x and SDXL models and FLUX"
        )

    def loaded_id(self, pipeline) -> str:
        # SD 2.x UNets use linear projections in their transformer blocks; SD 1.x use 1x1 convs.
        return "sd2" if pipeline.unet.config.use_linear_projection else "sd1"

    def training_scheduler(self, pipeline):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipeline.scheduler.config)

    def encode_text(self, model: LoadedModel, prompts: list[str], *, max_token_length: int, clip_skip: int):
        from training.prompts import TextConditioning, encode_prompts

        states = encode_prompts(
            model.tokenizer, model.text_encoder, prompts, max_token_length=max_token_length, clip_skip=clip_skip
        )
        return TextConditioning(states)

    def objective(self, model: LoadedModel, config: TrainingConfig) -> DdpmObjective:
        return DdpmObjective(model)

    def prediction_type(self, model: LoadedModel) -> str:
        return model.noise_scheduler.config.prediction_type

    def lora_models(self, model: LoadedModel) -> dict[str, torch.nn.Module]:
        models = {"unet": model.denoiser, "text_encoder": model.text_encoder}
        if model.text_encoder_2 is not None:
            models["text_encoder_2"] = model.text_encoder_2
        return models

    def meta_lora_models(self, folder: Path) -> dict[str, torch.nn.Module]:
        """The UNet and CLIP encoder, and SDXL's second one where the folder has it."""
        import torch
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        unet_config = UNet2DConditionModel.load_config(str(folder), subfolder="unet")
        text_config = CLIPTextConfig.from_pretrained(str(folder), subfolder="text_encoder")
        second_config = None
        if (folder / "text_encoder_2").is_dir():
            second_config = CLIPTextConfig.from_pretrained(str(folder), subfolder="text_encoder_2")
        with torch.device("meta"):
            models = {"unet": UNet2DConditionModel.from_config(unet_config), "text_encoder": CLIPTextModel(text_config)}
            if second_config:
                models["text_encoder_2"] = CLIPTextModelWithProjection(second_config)
        return models

    def base_model_version(self, model: LoadedModel) -> str:
        """sd_v1; sd_v2, or sd_v2_v for v-prediction."""
        if not self.v2:
            return "sd_v1"
        return "sd_v2_v" if model.prediction_type == "v_prediction" else "sd_v2"

    def modelspec_architecture(self, model: LoadedModel) -> str:
        return {
            "sd_v1": "stable-diffusion-v1",
            "sd_v2": "stable-diffusion-v2-512",
            "sd_v2_v": "stable-diffusion-v2-768-v",
        }[model.base_model_version]

    def tiny_pipeline(self, spec: TinySpec):
        """A two-level UNet with cross-attention at both levels over a 4-layer CLIP encoder; SD 2.x's has
        linear attention projections, a gelu text encoder and a DDIM scheduler, as the real 2.x models."""
        import torch
        from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel

        from training.models.builtin import byte_level_clip_tokenizer, tiny_clip_config, tiny_vae

        tokenizer = byte_level_clip_tokenizer()

        torch.manual_seed(spec.seed)
        unet = UNet2DConditionModel(
            sample_size=8,  # latent side; x8 VAE -> 64 px native resolution
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4) if self.v2 else 8,
            use_linear_projection=self.v2,
        )
        vae = tiny_vae(spec.seed + 1)
        torch.manual_seed(spec.seed + 2)
        text_encoder = CLIPTextModel(tiny_clip_config(tokenizer, hidden_act="gelu" if self.v2 else "quick_gelu"))
        betas = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        if self.v2:
            scheduler = DDIMScheduler(
                **betas, prediction_type=spec.prediction_type, clip_sample=False, set_alpha_to_one=False, steps_offset=1
            )
        else:
            scheduler = PNDMScheduler(
                **betas, skip_prk_steps=True, steps_offset=1, prediction_type=spec.prediction_type
            )
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


SD1 = StableDiffusion(v2=False)
SD2 = StableDiffusion(v2=True)


class DdpmObjective:
    """Epsilon or v-prediction over the model's discrete DDPM timesteps (SD 1.x/2.x and SDXL)."""

    def __init__(self, model: LoadedModel):
        self.model = model
        self.scheduler = model.noise_scheduler

    def sample_levels(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A uniformly drawn timestep per image."""
        import torch

        return torch.randint(
            0,
            self.scheduler.config.num_train_timesteps,
            (latents.shape[0],),
            generator=generator,
            device=latents.device,
        )

    def validation_levels(self, device: torch.device) -> torch.Tensor:
        import torch

        from training.objectives import VALIDATION_LEVELS

        total = self.scheduler.config.num_train_timesteps
        return torch.tensor([level * total // 1000 for level in VALIDATION_LEVELS], device=device)

    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.model.prediction_type == "epsilon":
            return noisy, noise
        return noisy, self.scheduler.get_velocity(latents, noise, timesteps)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
        unet = self.model.denoiser
        added = batch.added_conditions(dtype)  # SDXL's pooled text and size/crop ids
        return unet(
            noisy.to(dtype),
            timesteps,
            batch.conditioning.to(self.model.device, dtype),
            added_cond_kwargs=None if added is None else {k: v.to(self.model.device) for k, v in added.items()},
        ).sample

    def min_snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al. 2023): down-weight easy, low-noise timesteps."""
        import torch
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, timesteps)
        clipped = torch.clamp(snr, max=gamma)
        return clipped / (snr + 1) if self.model.prediction_type == "v_prediction" else clipped / snr
