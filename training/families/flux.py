"""FLUX-class models (id flux: FLUX.1-dev, FLUX.1-schnell, Flex.1): a 12 B parameter transformer
trained with rectified flow, conditioned on T5's token states and CLIP's pooled vector.

- Recognised by a Flux pipeline (not FLUX.2's Flux2*) or FluxTransformer2DModel in model_index.json; a
  single file (BFL's layout) holds the transformer only, so it needs base_model_config; Fill and Control
  models are refused (their transformer also takes image latents).
- Loading: the transformer can be loaded on its own (transformer_loading.py), from a single file and/or with
  8-bit weights (quantize_base); under fp16 T5 stays fp32 (its activations overflow).
- Captions: T5 states (up to 512 tokens for dev, 256 for schnell, as each was trained) and CLIP's
  pooled vector, by FluxPipeline.encode_prompt; no negative prompt (guidance is an input of the
  distilled model, or absent).
- Objective: x_sigma = (1 - sigma) * x0 + sigma * noise for a noise level sigma in (0, 1); the
  transformer predicts the velocity noise - x0 from latents packed in 2x2 patches.
- LoRA: the transformer alone (CLIP gives only the pooled vector, T5 is 4.7 B parameters), written
  in the diffusers layout with `.alpha` tensors.
- The guide: its FLUX row assumes 8-bit weights; plans train in bf16 with Adafactor; captions also name
  a camera angle, an environment and the lighting; samples render at guidance 3.5.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from training.families.base import HardwareRow, read_config
from training.families.flow import JOINT_ATTENTION_MODULES, FlowFamily, RectifiedFlow
from training.families.transformer_loading import QuantizationUnavailable as QuantizationUnavailable  # re-exported

if TYPE_CHECKING:
    import torch

    from training.config import TrainingConfig
    from training.data.loader import Batch
    from training.models.builtin import TinySpec
    from training.models.loading import LoadedModel
    from training.models.source import ModelSource

# The attention projections of the image and text streams, the feed-forward layers of the
# double-stream blocks, and the single-stream blocks' fused MLP input and output (as ai-toolkit and
# diffusers' FLUX LoRA script adapt them). Names are matched as module-name suffixes by peft.
FLUX_TARGET_MODULES = (
    *JOINT_ATTENTION_MODULES,
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
)
# T5's sequence length: dev (guidance-distilled) was trained with 512 tokens, schnell with 256.
FLUX_T5_TOKENS = {True: 512, False: 256}
# FLUX.1-dev and Flex.1 are guidance-distilled: LoRAs are trained with the guidance input at 1
# (kohya's and ai-toolkit's setting), and rendered at 3-4.
TRAINING_GUIDANCE = 1.0
# The guide's "Required Hardware" and "Training Time" row. FLUX's 12B transformer alone is 24 GB at 16 bits, so
# the guide's 16/24 GB imply 8-bit weights (as ai-toolkit quantizes them): transformer 11.9 GB, T5-XXL 4.8 GB +
# CLIP-L and VAE 0.4 GB. (quantize_base quantizes the transformer only; this trainer's T5 is 9.5 GB at 16 bits, and
# low_vram keeps it off the GPU: the estimate's 4.8 GB of it errs on the safe side there.)
FLUX_HARDWARE = HardwareRow(1024, 16, 24, (60, 120), denoiser_gb=11.9, encoders_gb=5.2, quantized=True)
# Words that show each of the FLUX caption elements the guide lists (beyond trigger and subject).
FLUX_CAPTION_ELEMENTS = {
    "camera angle": r"\b(view|shot|angle|close-?up|portrait|full body|aerial|overhead|profile|three-quarter|wide)\b",
    "environment": r"\b(in an? |on an? |at an? |background|studio|outdoors?|indoors?|forest|city|room|street|beach)",
    "lighting": r"\b(light(ing)?|lit|sunlight|sunset|golden hour|shadows?|backlit|neon|candle|torch|dramatic)\b",
}

# The tiny FLUX transformer's blocks (Chroma's tiny transformer has the same): one double- and one single-stream
# block of two heads over 2x2 patches of the 16-channel latents, packed as FLUX packs them.
TINY_FLUX_BLOCKS = dict(
    patch_size=1,
    in_channels=16 * 4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    axes_dims_rope=(4, 6, 6),  # sums to the head dimension
)


class Flux(FlowFamily):
    id = "flux"
    described = "a FLUX-class"
    name = "FLUX"
    hardware = FLUX_HARDWARE
    told_by_size = False  # 1024 px, as SDXL
    sample_guidance = 3.5  # the guidance a guidance-distilled model (dev, Flex.1) renders at
    memory_precision = "bf16"  # its activations overflow fp16
    plan_quantize_reason = (
        "8bit: the guide's FLUX row (16 GB minimum, 24 GB recommended) fits only with the 12 B transformer's "
        "weights in 8 bits (~12 GB instead of ~24 GB); the LoRA still trains in full precision. It needs "
        "bitsandbytes (CUDA) or torchao installed; set quantize_base none on a 40+ GB GPU"
    )
    caption_elements = FLUX_CAPTION_ELEMENTS
    caption_example = "three-quarter view, in a medieval castle, torch lighting"
    denoiser_class = "FluxTransformer2DModel"
    text_encoders = ("text_encoder", "text_encoder_2")  # CLIP (the pooled vector) and T5 (the token states)
    pooled_text = True
    fp16_overflows = ("vae", "text_encoder_2")  # T5's activations overflow in fp16 too
    lora_target_modules = FLUX_TARGET_MODULES
    # ...but not the transformer's own final projection to latent patches, which is also named proj_out
    # (kohya and ai-toolkit leave that final layer alone too); peft full-matches a string pattern.
    lora_excluded_modules = "proj_out"
    uses_negative_prompt = False
    kohya_layout_refusal = (
        "kohya's FLUX layout (BFL's fused qkv projections) is not written: use diffusers or comfyui, the "
        "layout ComfyUI, Forge and diffusers load for FLUX"
    )
    alpha_tensors = True  # the diffusers layout with alphas, which ComfyUI maps onto its FLUX model
    text_encoder_refusal = "its T5 encoder has 4.7 B parameters and CLIP gives only a pooled vector"
    clip_skip_note = "its prompt states come from T5"
    caption_reader = "T5 (up to 512 tokens) anyway"
    single_file_example = "black-forest-labs/FLUX.1-dev"
    modelspec_implementation = "https://github.com/black-forest-labs/flux"

    def named_by(self, name: str) -> bool:
        return "flux" in name or "flex" in name  # FLUX.1 and its Flex derivatives

    def default_optimizer(self) -> tuple[str, str]:
        return "adafactor", (
            "adafactor for FLUX: its 12 B transformer leaves little room on the guide's 16-24 GB, and Adafactor "
            "'uses less memory than AdamW' (the guide's Memory Optimization) with no extra package"
        )

    def recognises(self, index: Mapping, folder: Path) -> bool:
        # FLUX.1's pipelines (FluxPipeline, FluxFillPipeline, ...), not FLUX.2's (Flux2Pipeline, Flux2KleinPipeline)
        pipeline = str(index.get("_class_name", ""))
        return (pipeline.startswith("Flux") and not pipeline.startswith("Flux2")) or "FluxTransformer2DModel" in str(
            index.get("transformer")
        )

    def recognises_checkpoint(self, kind: str) -> bool:
        # flux-dev, flux-schnell, flux-fill, ...; diffusers' flux-2-dev and flux-3-* are later architectures
        return kind.startswith("flux") and not kind.startswith(("flux-2", "flux-3"))

    def refusal(self, source: ModelSource) -> str | None:
        """A single file without base_model_config (BFL's checkpoints hold the transformer only), or a
        Fill / Control transformer, which takes image or control latents beside the noisy ones (384 / 128
        input channels instead of 64) that this trainer's text-to-image objective does not feed."""
        if refusal := super().refusal(source):
            return refusal
        folder = source.config_folder if source.kind == "single_file" else source.path
        try:
            transformer = read_config(folder / "transformer" / "config.json")
            vae = read_config(folder / "vae" / "config.json")
            got, expected = int(transformer["in_channels"]), 4 * int(vae["latent_channels"])  # 2x2 latent patches
        except (OSError, ValueError, KeyError, TypeError):
            return None  # loading says what is missing
        if got == expected:
            return None
        return (
            f"{source.path} is a FLUX model whose transformer takes {got} input channels, not the {expected} of "
            "text-to-image FLUX (a Fill or Control model, which also conditions on an image); this trainer trains "
            "text-to-image FLUX LoRAs (FLUX.1-dev, FLUX.1-schnell, Flex.1)"
        )

    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    def lora_state_dict(self, path, models):
        # kohya FLUX (fused qkv split; alphas baked into the weights), XLabs, BFL control, ... converted by diffusers.
        return self.pipeline_class().lora_state_dict(str(path), return_alphas=True)

    def encode_text(self, model: LoadedModel, prompts: list[str], *, max_token_length: int, clip_skip: int):
        from training.prompts import TextConditioning

        states, pooled, _ = model.pipeline.encode_prompt(
            prompts,
            device=model.text_encoder_2.device,
            max_sequence_length=FLUX_T5_TOKENS[model.guidance_embedded],
        )
        return TextConditioning(states.float(), pooled.float())

    def objective(self, model: LoadedModel, config: TrainingConfig) -> FlowMatchingObjective:
        return FlowMatchingObjective(model, config)

    def guidance_embedded(self, model: LoadedModel) -> bool:
        """FLUX.1-dev and Flex.1 take the guidance scale as an input (distilled guidance); schnell does not."""
        return bool(model.denoiser.config.guidance_embeds)

    def meta_lora_models(self, folder: Path) -> dict[str, torch.nn.Module]:
        """The transformer, and the CLIP encoder: this trainer adapts the transformer only, but LoRAs of other
        tools (diffusers' FLUX script with --train_text_encoder) also adapt CLIP; both are read, merged and
        converted."""
        import torch
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel

        transformer_config = FluxTransformer2DModel.load_config(str(folder), subfolder="transformer")
        clip_config = CLIPTextConfig.from_pretrained(str(folder), subfolder="text_encoder")
        with torch.device("meta"):
            return {
                "transformer": FluxTransformer2DModel.from_config(transformer_config),
                "text_encoder": CLIPTextModel(clip_config),
            }

    def sample_latents(self, model: LoadedModel, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """FLUX returns its latents packed in 2x2 patches."""
        return model.pipeline._unpack_latents(latents, height, width, model.vae_scale_factor)

    def base_model_version(self, model: LoadedModel) -> str:
        return "flux1"

    def modelspec_architecture(self, model: LoadedModel) -> str:
        """The SAI model spec names FLUX.1 by variant: dev (guidance-distilled) or schnell."""
        return "flux-1-dev" if model.guidance_embedded else "flux-1-schnell"

    def tiny_pipeline(self, spec: TinySpec):
        """A FluxTransformer2DModel with one double- and one single-stream block and the guidance embedding,
        a CLIP encoder for the pooled prompt and a T5 encoder for the token states, with a T5 tokenizer made
        from a byte vocabulary, and a 16-channel VAE with FLUX's scaling and shift (its config's sample
        size, 64, is the native resolution the trainer reads)."""
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextModel

        from training.models.builtin import (
            byte_level_clip_tokenizer,
            tiny_clip_config,
            tiny_flux_vae,
            tiny_t5,
            tiny_t5_tokenizer,
        )

        clip_tokenizer = byte_level_clip_tokenizer()
        t5_tokenizer = tiny_t5_tokenizer()
        width = 32
        torch.manual_seed(spec.seed)
        transformer = FluxTransformer2DModel(
            **TINY_FLUX_BLOCKS,
            joint_attention_dim=width,  # T5 states
            pooled_projection_dim=width,  # CLIP pooled
            guidance_embeds=True,  # as FLUX.1-dev and Flex.1
        )
        vae = tiny_flux_vae(spec.seed + 1)
        torch.manual_seed(spec.seed + 2)
        text_encoder = CLIPTextModel(tiny_clip_config(clip_tokenizer, num_hidden_layers=2))
        text_encoder_2 = tiny_t5(spec.seed + 3, t5_tokenizer, d_model=width)
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=clip_tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=t5_tokenizer,
            transformer=transformer,
        )


FLUX = Flux()


class FlowMatchingObjective(RectifiedFlow):
    """FLUX's transformer: latents packed in 2x2 patches with their position ids, sigma as the timestep, the
    guidance input at TRAINING_GUIDANCE for a guidance-distilled model, and CLIP's pooled vector."""

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
        import torch
        from diffusers import FluxPipeline

        transformer, factor = self.model.denoiser, self.model.vae_scale_factor
        device = self.model.device
        count, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy.to(dtype), count, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(count, height // 2, width // 2, device, dtype)
        text = batch.conditioning.to(device, dtype)
        text_ids = torch.zeros(text.shape[1], 3, device=device, dtype=dtype)
        guidance = (
            torch.full((count,), TRAINING_GUIDANCE, device=device, dtype=torch.float32)
            if self.model.guidance_embedded
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
