"""The transformer families (FLUX, SD 3.5, Chroma, Qwen-Image, Z-Image): what they share as families
(FlowFamily), and their objective, rectified flow (RectifiedFlow):
x_sigma = (1 - sigma) * x0 + sigma * noise for a noise level sigma in (0, 1), and the denoiser learns the
velocity noise - x0. What differs by family is only how its transformer is called (`predict`: how latents
are packed, which timestep it takes, the sign of its output) and how many image tokens a latent makes
(`image_tokens`, which a resolution-dependent shift reads).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from training.families.base import ModelFamily, vae_factor
from training.families.transformer_loading import load_with_transformer
from training.guide import CAPTION_TOKENS

if TYPE_CHECKING:
    import torch

    from training.config import TrainingConfig
    from training.data.loader import Batch
    from training.models.loading import LoadedModel
    from training.models.source import ModelSource

# The attention projections of a joint (image and text stream) transformer block as diffusers names them in FLUX,
# SD 3.5 and Qwen-Image: the image stream's q, k, v and output, the text stream's add_q/k/v and to_add_out.
JOINT_ATTENTION_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class FlowFamily(ModelFamily):
    """A transformer family trained by rectified flow (FLUX, SD 3.5, Chroma, Qwen-Image, Z-Image): what they share.
    Its transformer (`denoiser_class`, diffusers' class name) sees 2x2 latent patches and is what a LoRA adapts;
    it may be loaded on its own (a single file, 8-bit weights); its scheduler is the model's flow-matching one.
    Options of DDPM training and of CLIP captions are refused or ignored with the family's own words."""

    denoiser_prefix = "transformer"
    text_states_on_cpu = True  # large token states (T5's 512 x 4096: 8 MB per caption)
    comfyui_layout = "diffusers"
    # Why its LoRAs do not adapt the text encoders (train_text_encoder is refused), or None where they may.
    text_encoder_refusal: str | None = None
    clip_skip_note: str  # why clip_skip has no effect: "its prompt states come from T5"
    caption_reader: str  # what reads captions instead of CLIP's 75-token chunks: "T5 (up to 512 tokens) anyway"
    # Where its single files hold the transformer only: the model whose diffusers folder a refusal names as the
    # base_model_config to give ("black-forest-labs/FLUX.1-dev"); None where a single file needs none.
    single_file_example: str | None = None

    def refusal(self, source: ModelSource) -> str | None:
        """A single file without base_model_config, where its single files hold the transformer only."""
        if source.kind == "single_file" and source.config_folder is None and self.single_file_example:
            return (
                f"{source.path} is a {self.name} checkpoint, which holds the transformer only: set base_model_config "
                "to the diffusers folder (or Hugging Face id in the local cache) of its model, e.g. "
                f"{self.single_file_example}, for its VAE, text encoders and configs"
            )
        return None

    def conflicts(self, config: TrainingConfig) -> tuple[list[str], list[str]]:
        """Refused: a text-encoder LoRA (where `text_encoder_refusal`), Min-SNR weighting, kohya's layout; ignored:
        CLIP's options and a shift without shift sampling."""
        errors: list[str] = []
        warnings: list[str] = []
        if config.train_text_encoder and self.text_encoder_refusal:
            errors.append(
                f"train_text_encoder: {self.name} LoRAs train the transformer only ({self.text_encoder_refusal}): "
                "set train_text_encoder to false"
            )
        if config.min_snr_gamma:
            errors.append(
                f"min_snr_gamma weighs DDPM timesteps; {self.name} trains by flow matching: remove min_snr_gamma "
                "(timestep_sampling chooses how noise levels are drawn)"
            )
        if config.output_format == "kohya" and self.kohya_layout_refusal:
            errors.append(f"output_format kohya: {self.kohya_layout_refusal}")
        if config.clip_skip != 1:
            warnings.append(f"clip_skip {config.clip_skip} has no effect on {self.name}: {self.clip_skip_note}")
        if config.timestep_shift is not None and config.timestep_sampling != "shift":
            warnings.append(
                f"timestep_shift is used by timestep_sampling shift only; {config.timestep_sampling} ignores it"
            )
        if config.max_token_length != CAPTION_TOKENS:
            warnings.append(f"max_token_length is CLIP's; {self.name} reads captions through {self.caption_reader}")
        return errors, warnings

    def geometry(self, vae: Mapping, denoiser: Mapping) -> tuple[int, int] | None:
        """A transformer has no sample size: the VAE's config records the size it was trained at (1024 for
        FLUX.1); buckets step by the VAE factor x 2, the transformer's 2x2 latent patches (16 px)."""
        factor, sample_size = vae_factor(vae), vae["sample_size"]
        return (sample_size, factor * 2) if factor is not None and isinstance(sample_size, int) else None

    def transformer_class(self) -> type:
        """The diffusers class of its transformer."""
        import diffusers

        return getattr(diffusers, self.denoiser_class)

    def load_pipeline(self, source: ModelSource, device, dtypes, *, quantize: str):
        """From a diffusers folder as any family; with 8-bit weights, or from a single file that holds the
        transformer only (BFL's FLUX files), the transformer on its own and the rest from the folder
        (base_model_config's for a single file, as diffusers documents for FLUX single files)."""
        if quantize != "8bit" and source.kind != "single_file":
            return super().load_pipeline(source, device, dtypes, quantize=quantize)
        transformer_class = self.transformer_class()
        return load_with_transformer(
            self.pipeline_class(), transformer_class, source, device, dtypes, quantize=quantize, **self.pipeline_options
        )

    def training_scheduler(self, pipeline):
        return type(pipeline.scheduler).from_config(pipeline.scheduler.config)  # the model's flow-matching Euler

    def prediction_type(self, model: LoadedModel) -> str:
        return "flow_matching"

    def lora_models(self, model: LoadedModel) -> dict[str, torch.nn.Module]:
        return {"transformer": model.denoiser}

    def meta_lora_models(self, folder: Path) -> dict[str, torch.nn.Module]:
        """The transformer, from its config."""
        import torch

        transformer_class = self.transformer_class()
        config = transformer_class.load_config(str(folder), subfolder="transformer")
        with torch.device("meta"):
            return {"transformer": transformer_class.from_config(config)}


class RectifiedFlow:
    """The noise level drawn by `timestep_sampling`:
    uniform in (0, 1); logit_normal, sigmoid of a standard normal (most draws mid-range); or shift, the
    logit-normal draw moved towards high noise by s*sigma / (1 + (s-1)*sigma), with s = timestep_shift or
    the model scheduler's own shift (FLUX.1-dev's grows with the image's token count: e^0.5 at 256
    tokens, e^1.15 = 3.16 at 4096, i.e. 1024 px)."""

    def __init__(self, model: LoadedModel, config: TrainingConfig):
        self.model = model
        self.sampling = config.timestep_sampling
        self.fixed_shift = config.timestep_shift

    def sample_levels(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        import torch

        count, device = latents.shape[0], latents.device
        if self.sampling == "uniform":
            return torch.rand((count,), generator=generator, device=device)
        sigmas = torch.sigmoid(torch.randn((count,), generator=generator, device=device))
        if self.sampling == "logit_normal":
            return sigmas
        shift = self.shift(tokens=self.image_tokens(latents))
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def shift(self, tokens: int) -> float:
        """The sigma shift for an image of `tokens` packed latent patches."""
        if self.fixed_shift is not None:
            return self.fixed_shift
        config = self.model.noise_scheduler.config
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
        import torch

        from training.objectives import VALIDATION_LEVELS

        return torch.tensor([level / 1000 for level in VALIDATION_LEVELS], device=device)

    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = sigmas.to(latents.dtype).view(-1, 1, 1, 1)
        return (1 - s) * latents + s * noise, noise - latents

    def image_tokens(self, latents: torch.Tensor) -> int:
        """The transformer's image tokens for these latents: 2x2 latent patches."""
        return (latents.shape[2] // 2) * (latents.shape[3] // 2)

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
        """The transformer's velocity for `noisy` at `sigmas`, in the latents' (batch, channels, h, w) shape."""
        raise NotImplementedError
