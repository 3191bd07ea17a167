"""FLUX-class models (id flux: FLUX.1-dev, FLUX.1-schnell, Flex.1): a 12 B parameter transformer
trained with rectified flow, conditioned on T5's token states and CLIP's pooled vector.

- Recognised by a Flux pipeline or FluxTransformer2DModel in model_index.json; a single file (BFL's
  layout) holds the transformer only, so it needs base_model_config; Fill and Control models are
  refused (their transformer also takes image latents).
- Loading: the transformer can be loaded on its own, from a single file and/or with 8-bit weights
  (quantize_base); under fp16 T5 stays fp32 (its activations overflow).
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

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from training.families.base import HardwareRow, ModelFamily, read_config, vae_factor
from training.guide import CAPTION_TOKENS

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
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
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


class QuantizationUnavailable(RuntimeError):
    """quantize_base asks for a library that is not installed; the message names it."""


class Flux(ModelFamily):
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
    denoiser_prefix = "transformer"
    fp16_overflows = ("vae", "text_encoder_2")  # T5's activations overflow in fp16 too
    lora_target_modules = FLUX_TARGET_MODULES
    # ...but not the transformer's own final projection to latent patches, which is also named proj_out
    # (kohya and ai-toolkit leave that final layer alone too); peft full-matches a string pattern.
    lora_excluded_modules = "proj_out"
    uses_negative_prompt = False
    text_states_on_cpu = True  # T5 states are 512 x 4096: 8 MB per caption
    kohya_layout_refusal = (
        "kohya's FLUX layout (BFL's fused qkv projections) is not written: use diffusers or comfyui, the "
        "layout ComfyUI, Forge and diffusers load for FLUX"
    )
    comfyui_layout = "diffusers"  # with alphas, which ComfyUI maps onto its FLUX model
    alpha_tensors = True
    modelspec_implementation = "https://github.com/black-forest-labs/flux"

    def named_by(self, name: str) -> bool:
        return "flux" in name or "flex" in name  # FLUX.1 and its Flex derivatives

    def default_optimizer(self) -> tuple[str, str]:
        return "adafactor", (
            "adafactor for FLUX: its 12 B transformer leaves little room on the guide's 16-24 GB, and Adafactor "
            "'uses less memory than AdamW' (the guide's Memory Optimization) with no extra package"
        )

    def conflicts(self, config: TrainingConfig) -> tuple[list[str], list[str]]:
        """Refused: a text-encoder LoRA, Min-SNR weighting, kohya's layout; ignored: CLIP's options and a shift
        without shift sampling."""
        errors: list[str] = []
        warnings: list[str] = []
        if config.train_text_encoder:
            errors.append(
                "train_text_encoder: FLUX LoRAs train the transformer only (its T5 encoder has 4.7 B parameters "
                "and CLIP gives only a pooled vector): set train_text_encoder to false"
            )
        if config.min_snr_gamma:
            errors.append(
                "min_snr_gamma weighs DDPM timesteps; FLUX trains by flow matching: remove min_snr_gamma "
                "(timestep_sampling chooses how noise levels are drawn)"
            )
        if config.output_format == "kohya":
            errors.append(
                "output_format kohya: kohya's FLUX layout (fused qkv of BFL's blocks) is not written; use "
                "diffusers, which ComfyUI, Forge and diffusers load for FLUX"
            )
        if config.clip_skip != 1:
            warnings.append(f"clip_skip {config.clip_skip} has no effect on FLUX: its prompt states come from T5")
        if config.timestep_shift is not None and config.timestep_sampling != "shift":
            warnings.append(
                f"timestep_shift is used by timestep_sampling shift only; {config.timestep_sampling} ignores it"
            )
        if config.max_token_length != CAPTION_TOKENS:
            warnings.append("max_token_length is CLIP's; FLUX reads captions through T5 (up to 512 tokens) anyway")
        return errors, warnings

    def recognises(self, index: Mapping, folder: Path) -> bool:
        return str(index.get("_class_name", "")).startswith("Flux") or "FluxTransformer2DModel" in str(
            index.get("transformer")
        )

    def recognises_checkpoint(self, kind: str) -> bool:
        return kind.startswith("flux")  # flux-dev, flux-schnell, flux-fill, ...

    def refusal(self, source: ModelSource) -> str | None:
        """A single file without base_model_config (BFL's checkpoints hold the transformer only), or a
        Fill / Control transformer, which takes image or control latents beside the noisy ones (384 / 128
        input channels instead of 64) that this trainer's text-to-image objective does not feed."""
        if source.kind == "single_file" and source.config_folder is None:
            return (
                f"{source.path} is a FLUX checkpoint, which holds the transformer only: set base_model_config to the "
                "diffusers folder (or Hugging Face id in the local cache) of its model, e.g. "
                "black-forest-labs/FLUX.1-dev, for its VAE, text encoders and configs"
            )
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

    def geometry(self, vae: Mapping, denoiser: Mapping) -> tuple[int, int] | None:
        """A transformer has no sample size: the VAE's config records the size it was trained at (1024 for
        FLUX.1); buckets step by the VAE factor x 2, the transformer's 2x2 latent patches (16 px)."""
        factor, sample_size = vae_factor(vae), vae["sample_size"]
        return (sample_size, factor * 2) if factor is not None and isinstance(sample_size, int) else None

    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    def lora_state_dict(self, path, models):
        # kohya FLUX (fused qkv split; alphas baked into the weights), XLabs, BFL control, ... converted by diffusers.
        return self.pipeline_class().lora_state_dict(str(path), return_alphas=True)

    def load_pipeline(self, source: ModelSource, device, dtypes, *, quantize: str):
        if quantize != "8bit" and source.kind != "single_file":
            return super().load_pipeline(source, device, dtypes, quantize=quantize)
        # A FLUX single file (BFL's layout) holds the transformer only; the rest of the pipeline comes
        # from base_model_config's folder, as diffusers documents for FLUX single files.
        transformer = flux_transformer(source, device, quantize=quantize, dtype=dtypes["default"])
        folder = source.config_folder if source.kind == "single_file" else source.path
        return self.pipeline_class().from_pretrained(str(folder), dtype=dtypes, transformer=transformer)

    def training_scheduler(self, pipeline):
        return type(pipeline.scheduler).from_config(pipeline.scheduler.config)  # flow-matching Euler

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

    def prediction_type(self, model: LoadedModel) -> str:
        return "flow_matching"

    def guidance_embedded(self, model: LoadedModel) -> bool:
        """FLUX.1-dev and Flex.1 take the guidance scale as an input (distilled guidance); schnell does not."""
        return bool(model.denoiser.config.guidance_embeds)

    def lora_models(self, model: LoadedModel) -> dict[str, torch.nn.Module]:
        return {"transformer": model.denoiser}

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
        from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

        from training.models.builtin import byte_level_clip_tokenizer, byte_symbols, tiny_clip_config, tiny_vae

        clip_tokenizer = byte_level_clip_tokenizer()
        # T5's SentencePiece vocabulary, rebuilt offline: the special tokens, then every byte symbol.
        pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(symbol, -1.0) for symbol in byte_symbols()]
        t5_tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=64)
        width = 32
        torch.manual_seed(spec.seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16 * 4,  # 2x2 patches of the 16-channel latents, packed as FLUX packs them
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=width,  # T5 states
            pooled_projection_dim=width,  # CLIP pooled
            guidance_embeds=True,  # as FLUX.1-dev and Flex.1
            axes_dims_rope=(4, 6, 6),  # sums to the head dimension
        )
        vae = tiny_vae(  # FLUX's 16 latent channels, scaling and shift, no quant convs
            spec.seed + 1,
            latent_channels=16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        torch.manual_seed(spec.seed + 2)
        text_encoder = CLIPTextModel(tiny_clip_config(clip_tokenizer, num_hidden_layers=2))
        torch.manual_seed(spec.seed + 3)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=width,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=16,
                pad_token_id=0,
                eos_token_id=1,
            )
        )
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


def flux_transformer(source: ModelSource, device: torch.device, *, quantize: str, dtype: torch.dtype):
    """The FLUX transformer loaded on its own: from a single file, and/or with 8-bit weights (`quantize`
    "8bit": about half of its bf16 memory, 12 B parameters in ~12 GB instead of ~24 GB), through
    bitsandbytes' LLM.int8 on CUDA (its quantizer needs a GPU), else torchao's int8 weight-only (CPU or
    GPU). peft attaches trainable full-precision LoRA layers to either."""
    import importlib.util

    import torch
    from diffusers import FluxTransformer2DModel

    options: dict = {"dtype": dtype}
    if quantize == "8bit":
        if device.type == "cuda" and importlib.util.find_spec("bitsandbytes"):
            from diffusers import BitsAndBytesConfig

            options["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        elif importlib.util.find_spec("torchao"):
            from diffusers import TorchAoConfig
            from torchao.quantization import Int8WeightOnlyConfig

            options["quantization_config"] = TorchAoConfig(Int8WeightOnlyConfig())
        else:
            raise QuantizationUnavailable(
                "quantize_base 8bit needs bitsandbytes (CUDA: pip install bitsandbytes) or torchao (pip install "
                "torchao); install one, or set quantize_base to none"
            )
        options["dtype"] = torch.float32  # the layers left unquantized (norms, embeddings): small
    if source.kind == "single_file":
        return FluxTransformer2DModel.from_single_file(
            str(source.path),
            config=str(source.config_folder),
            subfolder="transformer",
            local_files_only=True,
            **options,
        )
    return FluxTransformer2DModel.from_pretrained(str(source.path), subfolder="transformer", **options)


class FlowMatchingObjective:
    """Rectified flow with the noise level drawn by `timestep_sampling`:
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
        shift = self.shift(tokens=(latents.shape[2] // 2) * (latents.shape[3] // 2))
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
