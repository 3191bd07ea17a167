"""Chroma (id chroma: Chroma1-HD, Chroma1-Base): an 8.9 B parameter transformer derived from FLUX.1-schnell,
trained with rectified flow, conditioned on T5's token states alone, without guidance distillation.

- Recognised by ChromaPipeline or ChromaTransformer2DModel in model_index.json; a single file (lodestones'
  layout, diffusers' kind "chroma", told from FLUX by its distilled_guidance_layer) holds the transformer
  only, so it needs base_model_config.
- Loading: as FLUX, the transformer can be loaded on its own, from a single file and/or with 8-bit weights
  (quantize_base); under fp16 T5 stays fp32 (its activations overflow).
- Captions: T5 states (512 tokens) by ChromaPipeline.encode_prompt, with a mask: T5's padding is masked
  except its first pad token, as Chroma was trained. The mask is kept boolean (`masked_chroma_pipeline`:
  diffusers 0.42.1's pipeline makes it a float mask, which attention adds to its scores instead of masking).
  No pooled vector; a negative prompt (real classifier-free guidance: there is no guidance input).
- Objective: FLUX's rectified flow (x_sigma = (1 - sigma) * x0 + sigma * noise, velocity noise - x0) on
  latents packed in 2x2 patches, sigma as the timestep, the text mask extended over the image tokens.
- LoRA: the transformer alone, FLUX's layers, written in FLUX's diffusers layout with `.alpha` tensors
  (which ComfyUI maps through its FLUX branch, Chroma's model being a FLUX subclass, and diffusers' Chroma
  loader reads).
- The guide has no Chroma row: its numbers scale FLUX's by the transformers' sizes (8.9 B against 12 B);
  plans train in bf16 with Adafactor and 8-bit weights; captions as FLUX's; samples at guidance 5.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from training.families.base import FROM_PARAMETER_COUNTS, HardwareRow
from training.families.flow import FlowFamily, RectifiedFlow
from training.families.flux import FLUX, FLUX_CAPTION_ELEMENTS, FLUX_TARGET_MODULES, TINY_FLUX_BLOCKS, Flux

if TYPE_CHECKING:
    import torch

    from training.config import TrainingConfig
    from training.data.loader import Batch
    from training.models.builtin import TinySpec
    from training.models.loading import LoadedModel

# Chroma was trained with T5's full 512 tokens (ChromaPipeline's limit and default).
CHROMA_T5_TOKENS = 512
# No guide row. Weights at 2 bytes per parameter: the 8.9 B transformer 17.8 GB, 8.9 GB in 8 bits (plans
# quantize it, as FLUX's row assumes); T5-XXL 9.5 GB + VAE 0.2 GB. Its 19 double and 38 single blocks of
# width 3072 are FLUX's, so its activations are FLUX's row's (24 - 11.9 - 5.2 - 0.6 GB of LoRA state = 6.3 GB):
# 8.9 + 9.7 + 0.6 + 6.3 = 25.5 GB recommended; 16 GB with low_vram (T5 off the GPU) and checkpointing, as
# FLUX. Time: FLUX's 60-120 min per 1k steps x 8.9 / 11.9 of its transformer's work.
CHROMA_HARDWARE = HardwareRow(
    1024, 16, 26, (45, 90), denoiser_gb=8.9, encoders_gb=9.7, quantized=True, estimated=FROM_PARAMETER_COUNTS
)


# Names of Chroma models (Chroma1-HD, chroma-unlocked-v50), not of others that contain the letters ("chromatic").
CHROMA_NAME = re.compile(r"(^|[^a-z])chroma([^a-z]|$)")


class Chroma(FlowFamily):
    id = "chroma"
    described = "a Chroma"
    name = "Chroma"
    hardware = CHROMA_HARDWARE
    told_by_size = False  # 1024 px, as SDXL and FLUX
    sample_guidance = 5.0  # ChromaPipeline's default: real classifier-free guidance against the negative prompt
    memory_precision = "bf16"  # T5's activations overflow fp16
    plan_quantize_reason = (
        "8bit: Chroma's 8.9 B transformer is 17.8 GB in bf16 and 8.9 GB in 8 bits, which with T5 fits 24 GB; "
        "the LoRA still trains in full precision. It needs bitsandbytes (CUDA) or torchao installed; set "
        "quantize_base none on a 40+ GB GPU"
    )
    caption_elements = FLUX_CAPTION_ELEMENTS  # natural-language captions, as FLUX's
    caption_example = "three-quarter view, in a medieval castle, torch lighting"
    denoiser_class = "ChromaTransformer2DModel"
    text_encoders = ("text_encoder",)  # T5 only
    pooled_text = False
    checkpoint_types = ("chroma",)
    fp16_overflows = ("vae", "text_encoder")  # T5's activations overflow in fp16 too
    lora_target_modules = FLUX_TARGET_MODULES  # its blocks are FLUX's, with pruned (linear-free) modulation
    lora_excluded_modules = "proj_out"  # the final projection to latent patches, as for FLUX
    uses_negative_prompt = True
    text_encoder_refusal = "its T5 encoder has 4.7 B parameters"
    clip_skip_note = "it has no CLIP encoder"
    caption_reader = f"T5 ({CHROMA_T5_TOKENS} tokens) anyway"
    kohya_layout_refusal = (
        "kohya's Chroma layout (BFL's fused qkv projections) is not written: use diffusers or comfyui, the "
        "layout ComfyUI and diffusers load for Chroma"
    )
    single_file_example = "lodestones/Chroma1-HD"
    # comfyui_layout "diffusers", as FlowFamily's, with alphas (ComfyUI's FLUX branch maps it onto its Chroma)
    alpha_tensors = True  # diffusers' Chroma loader reads `.alpha` tensors (its FLUX conversion)
    modelspec_implementation = "https://huggingface.co/lodestones/Chroma"  # kohya's IMPL_CHROMA

    def named_by(self, name: str) -> bool:
        return CHROMA_NAME.search(name) is not None

    def default_optimizer(self) -> tuple[str, str]:
        return "adafactor", (
            "adafactor for Chroma: its 8.9 B transformer and T5 leave little room on 24 GB, and Adafactor 'uses "
            "less memory than AdamW' (the guide's Memory Optimization) with no extra package"
        )

    def recognises(self, index: Mapping, folder: Path) -> bool:
        return index.get("_class_name") == "ChromaPipeline" or "ChromaTransformer2DModel" in str(
            index.get("transformer")
        )

    # Where Chroma is FLUX beyond FlowFamily: its LoRA reader (FLUX's formats, with alphas) and packed latents.
    lora_state_dict = Flux.lora_state_dict
    sample_latents = Flux.sample_latents

    def pipeline_class(self):
        return masked_chroma_pipeline()

    def objective(self, model: LoadedModel, config: TrainingConfig) -> ChromaObjective:
        return ChromaObjective(model, config)

    def encode_text(self, model: LoadedModel, prompts: list[str], *, max_token_length: int, clip_skip: int):
        from training.prompts import TextConditioning

        states, _, mask, *_ = model.pipeline.encode_prompt(
            prompts,
            device=model.text_encoder.device,
            do_classifier_free_guidance=False,
            max_sequence_length=CHROMA_T5_TOKENS,
        )
        return TextConditioning(states.float(), mask=mask)

    def prompt_arguments(self, positive, negative) -> dict:
        """The states with their boolean masks, which ChromaPipeline requires beside prompt embeddings."""
        arguments = {"prompt_embeds": positive.states, "prompt_attention_mask": positive.mask.bool()}
        if negative is not None:
            arguments["negative_prompt_embeds"] = negative.states
            arguments["negative_prompt_attention_mask"] = negative.mask.bool()
        return arguments

    def base_model_version(self, model: LoadedModel) -> str:
        return "chroma"

    def modelspec_architecture(self, model: LoadedModel) -> str:
        return "chroma"  # kohya's ARCH_FLUX_1_CHROMA

    def tiny_pipeline(self, spec: TinySpec):
        """A ChromaTransformer2DModel with one double- and one single-stream block and a one-layer modulation
        approximator, with the T5 encoder and tokenizer and the 16-channel VAE of FLUX's tiny pipeline (built from
        the same seed): Chroma's text side and latents are FLUX's (the VAE config's sample size, 64, is the native
        resolution)."""
        import torch
        from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

        tiny_flux = FLUX.tiny_pipeline(spec)
        torch.manual_seed(spec.seed)
        transformer = ChromaTransformer2DModel(
            **TINY_FLUX_BLOCKS,
            joint_attention_dim=tiny_flux.text_encoder_2.config.d_model,  # T5 states
            approximator_num_channels=16,
            approximator_hidden_dim=32,
            approximator_layers=1,
        )
        return ChromaPipeline(  # saved as diffusers' own class: the folder is an ordinary Chroma model
            scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
            vae=tiny_flux.vae,
            text_encoder=tiny_flux.text_encoder_2,
            tokenizer=tiny_flux.tokenizer_2,
            transformer=transformer,
        )


CHROMA = Chroma()


@functools.cache
def masked_chroma_pipeline():
    """ChromaPipeline with the mask that Chroma was trained with: diffusers 0.42.1's own turns T5's mask into
    floats, which attention adds to its scores (+1 on the caption, 0 on the padding) instead of masking the
    padding (diffusers issue #13619); kept boolean, it masks, as ComfyUI and Chroma's own trainer do. Every
    render (generate-image, samples, evaluation) and every caption encoding goes through it."""
    from diffusers import ChromaPipeline

    class MaskedChromaPipeline(ChromaPipeline):
        def _get_t5_prompt_embeds(self, *args, **kwargs):
            states, mask = super()._get_t5_prompt_embeds(*args, **kwargs)
            return states, mask.bool()

    return MaskedChromaPipeline


class ChromaObjective(RectifiedFlow):
    """Chroma's transformer: latents packed in 2x2 patches with their position ids (as FLUX's), sigma as the
    timestep, no guidance or pooled input, and the caption's mask extended over the image tokens."""

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
        import torch
        from diffusers import FluxPipeline

        transformer, factor, device = self.model.denoiser, self.model.vae_scale_factor, self.model.device
        count, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy.to(dtype), count, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(count, height // 2, width // 2, device, dtype)
        text = batch.conditioning.to(device, dtype)
        image_tokens = torch.ones(count, packed.shape[1], device=device, dtype=torch.bool)
        mask = torch.cat([batch.text_mask.to(device).bool(), image_tokens], dim=1)
        velocity = transformer(
            hidden_states=packed,
            timestep=sigmas.to(dtype),  # sigma in (0, 1), scaled by 1000 inside
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=device, dtype=dtype),
            img_ids=image_ids,
            attention_mask=mask,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(velocity, height * factor, width * factor, factor)
