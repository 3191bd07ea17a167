"""FLUX.2 (id flux2: FLUX.2-dev): a 32 B parameter transformer (8 double- and 48 single-stream blocks, 6144 wide)
trained with rectified flow, conditioned on the hidden states of Mistral-Small-3.1-24B (a language model, 5120
wide), with its own VAE (AutoencoderKLFlux2: 32 latent channels, 8x, batch-norm statistics of its latents).

- Recognised by Flux2Transformer2DModel in model_index.json; trained only with the Mistral3 text encoder of
  Flux2Pipeline: FLUX.2 [klein] (Flux2KleinPipeline, a Qwen3 encoder) is refused with that reason. Every FLUX.2
  single file (BFL's layout) is diffusers' kind flux-2-dev and holds the transformer only; Flux2Pipeline has no
  single-file loader, so it needs base_model_config (the transformer is loaded alone, as FLUX's).
- Loading: the transformer can be loaded on its own, from a single file and/or with 8-bit weights (quantize_base).
  The released tokenizer folder is a PixtralProcessor, which transformers builds only with torchvision installed:
  without it the model is refused with what to install, before any weight is read.
- Latents: the VAE's latents in 2x2 patches (128 channels, 16 px per latent), normalised by the VAE's batch-norm
  running mean and variance, as Flux2Pipeline encodes reference images and denormalises before decoding.
- Captions: Mistral's hidden states of layers 10, 20 and 30 side by side, of the caption in Flux2Pipeline's chat
  template with its system message, padded to 512 tokens (Flux2Pipeline.encode_prompt): (512, 15360) per
  caption, no mask (the pipeline passes none either). No negative prompt: guidance is an input of the
  distilled model.
- Objective: x_sigma = (1 - sigma) * x0 + sigma * noise; the transformer takes the patched latents as tokens
  (patch size 1) with 4-D position ids (t, h, w, l) for them and the caption, sigma as its timestep and the
  guidance input at FLUX's training value 1, and predicts the velocity noise - x0.
- LoRA: the double blocks' 8 attention projections and the single blocks' fused qkv + MLP input (112 layers,
  3.7 M parameters per rank); written as `transformer.<module>` with alpha / rank folded into lora_B: diffusers'
  FLUX.2 loader refuses `.alpha` tensors, and ComfyUI's Flux branch reads the folded file at scale 1.
- Not in the guide, and far from its GPUs: FLUX2_HARDWARE says how its numbers come from the parameter counts.
  Plans quantize the transformer to 8 bits, keep Mistral off the GPU and drop it once captions are cached,
  checkpoint gradients and use Adafactor: ~42 GB, a 48 GB GPU (24 GB does not fit, whatever the settings);
  samples render at guidance 4, the model card's.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from training.families.base import FROM_PARAMETER_COUNTS, HardwareRow, read_config
from training.families.flow import JOINT_ATTENTION_MODULES, FlowFamily, RectifiedFlow
from training.families.flux import FLUX_CAPTION_ELEMENTS, TRAINING_GUIDANCE

if TYPE_CHECKING:
    import torch

    from training.config import TrainingConfig
    from training.data.loader import Batch
    from training.models.builtin import TinySpec
    from training.models.loading import LoadedModel
    from training.models.source import ModelSource

# The double blocks' attention projections of both streams (8 x 8) and the single blocks' fused q, k, v and MLP input
# (48): 112 layers, 3,735,552 LoRA parameters per rank on FLUX.2-dev (tests/test_full_size.py counts them), the
# targets of diffusers' FLUX.2 LoRA tests. The feed-forward layers (ff.linear_in/out, ff_context.linear_in/out: 32
# more, 4.8 M per rank in all) and the single blocks' attn.to_out can be added with target_modules.
FLUX2_TARGET_MODULES = (*JOINT_ATTENTION_MODULES, "to_qkv_mlp_proj")
# The caption's token count: Flux2Pipeline's max_sequence_length, which it renders with (and pads every caption to).
FLUX2_TEXT_TOKENS = 512
# Not in the guide: from the parameter counts. Meta-device counts: transformer 32.22 B parameters, 32.2 GB in 8 bits
# (64.4 GB in bf16); Mistral-Small-3.1-24B 23.34 B + VAE 0.08 B, 46.8 GB in bf16. Activations at 1024 px: FLUX's row's
# 6.3 GB (24 - 11.9 - 5.2 - 0.6 of LoRA state) x 6144 / 3072 wide x 56 / 57 blocks = ~12.4 GB. Recommended: 32.2 +
# 46.8 + 0.6 + 12.4 = 92 GB. Minimum, as plans set it (8-bit transformer, Mistral on the CPU under low_vram and
# released after caching, checkpointing, Adafactor): 32.2 + ~0.1 + 12.4 x 0.75 = ~41.6 GB, a 48 GB GPU; 24 GB cannot
# hold even the 8-bit transformer. Time: FLUX's 60-120 min per 1k steps x 32.2 / 11.9 of its transformer's work.
FLUX2_HARDWARE = HardwareRow(
    1024, 48, 92, (160, 320), denoiser_gb=32.2, encoders_gb=46.8, quantized=True, estimated=FROM_PARAMETER_COUNTS
)
# The guidance FLUX.2-dev renders at (its model card and Flux2Pipeline's default).
FLUX2_GUIDANCE = 4.0
# What FLUX.2-dev's model_index.json names its text encoder and tokenizer (transformers' classes).
FLUX2_TEXT_ENCODER = "Mistral3ForConditionalGeneration"
PIXTRAL_PROCESSOR = "PixtralProcessor"
# Words of FLUX.2 model names: FLUX.2-dev, flux2-dev, flux-2-dev, flux_2.
FLUX2_NAMES = ("flux.2", "flux2", "flux-2", "flux_2")


class Flux2(FlowFamily):
    id = "flux2"
    described = "a FLUX.2"
    name = "FLUX.2"
    hardware = FLUX2_HARDWARE
    told_by_size = False  # 1024 px, as SDXL
    sample_guidance = FLUX2_GUIDANCE
    memory_precision = "bf16"  # Mistral's activations overflow fp16
    plan_quantize_reason = (
        "8bit: FLUX.2's 32 B transformer is ~64 GB in bf16 and ~32 GB in 8 bits, which with the settings below fits "
        "a 48 GB GPU (an estimate from its parameter counts, not measured; no setting fits 24 GB); the LoRA still "
        "trains in full precision. It needs bitsandbytes (CUDA) or torchao installed; set quantize_base none on a "
        "GPU of 80 GB or more"
    )
    # What else plans set to fit the 48 GB estimate (FLUX2_HARDWARE), for a real-size model.
    plan_settings: ClassVar[Mapping[str, tuple[object, str]]] = {
        "low_vram": (
            True,
            "FLUX.2's text encoder (Mistral-Small-3.1, 24 B parameters, 46.7 GB in bf16) never goes to the GPU: "
            "captions are encoded once on the CPU (slow, and ~47 GB of RAM) and cached, then it is dropped",
        ),
        "gradient_checkpointing": (
            True,
            "the 56 blocks' activations (~12 GB at 1024 px) are recomputed in the backward pass instead of kept: "
            "with the 8-bit transformer's ~32 GB, what fits 48 GB (an estimate, not measured)",
        ),
    }
    caption_elements = FLUX_CAPTION_ELEMENTS  # a language model reads sentences: FLUX's caption elements
    caption_example = "three-quarter view, in a medieval castle, torch lighting"
    denoiser_class = "Flux2Transformer2DModel"
    checkpoint_types = ("flux-2-dev",)  # diffusers' kind for every FLUX.2 single file (BFL's layout)
    fp16_overflows = ("vae", "text_encoder")  # the language model's activations, as T5's
    lora_target_modules = FLUX2_TARGET_MODULES
    uses_negative_prompt = False  # guidance-distilled: Flux2Pipeline takes no negative prompt
    kohya_layout_refusal = (
        "kohya's FLUX.2 layout (BFL's fused qkv projections) is not written: use diffusers or comfyui, the layout "
        "ComfyUI and diffusers load for FLUX.2"
    )
    single_file_example = "black-forest-labs/FLUX.2-dev"
    fold_alpha = True
    releases_text_encoders = True  # Mistral: 23.3 B parameters, 46.7 GB in bf16 once captions are cached
    text_encoder_refusal = "its text encoder is the 24 B parameter Mistral-Small-3.1 language model"
    clip_skip_note = "its prompt states come from Mistral"
    caption_reader = f"Mistral (up to {FLUX2_TEXT_TOKENS} tokens) anyway"

    def named_by(self, name: str) -> bool:
        return any(word in name for word in FLUX2_NAMES)

    def default_optimizer(self) -> tuple[str, str]:
        return "adafactor", (
            "adafactor for FLUX.2: its 8-bit 32 B transformer takes ~32 GB of a 48 GB GPU, and Adafactor 'uses "
            "less memory than AdamW' (the guide's Memory Optimization) with no extra package"
        )

    def recognises(self, index: Mapping, folder: Path) -> bool:
        """Any FLUX.2 transformer (FLUX.2-dev's and [klein]'s): `refusal` tells which are trained."""
        return self.denoiser_class in str(index.get("transformer"))

    def refusal(self, source: ModelSource) -> str | None:
        """A single file without base_model_config; a FLUX.2 whose text encoder is not Mistral ([klein]: Qwen3);
        a released folder's PixtralProcessor tokenizer without torchvision."""
        if refusal := super().refusal(source):
            return refusal
        folder = source.config_folder if source.kind == "single_file" else source.path
        try:
            index = read_config(folder / "model_index.json")
            text_encoder, tokenizer = str(index.get("text_encoder")), str(index.get("tokenizer"))
        except (OSError, ValueError, AttributeError):
            return None  # loading says what is missing
        if FLUX2_TEXT_ENCODER not in text_encoder:
            return (
                f"{source.path} is a FLUX.2 model of {index.get('_class_name')} with the text encoder {text_encoder} "
                "(FLUX.2 [klein]'s is Qwen3); this trainer trains FLUX.2-dev LoRAs (Flux2Pipeline, with its "
                "Mistral-Small-3.1 text encoder)"
            )
        if PIXTRAL_PROCESSOR in tokenizer and importlib.util.find_spec("torchvision") is None:
            return (
                f"{source.path}'s tokenizer is a {PIXTRAL_PROCESSOR}, which transformers builds only with torchvision: "
                "install the torchvision release that matches the installed torch (pip install torchvision, with "
                "the same index URL torch came from), then train again"
            )
        return None

    def pipeline_class(self):
        from diffusers import Flux2Pipeline

        return Flux2Pipeline

    def vae_scale_factor(self, vae: Mapping) -> int | None:
        """Pixels per latent as the transformer sees them: the VAE's 8, x 2 for the 2x2 patches (16)."""
        factor = super().vae_scale_factor(vae)
        return factor * 2 if factor is not None else None

    def latent_channels(self, vae: Mapping) -> int:
        return 4 * vae["latent_channels"]  # 2x2 patches: 128 for the real VAE's 32

    def encode_latents(self, vae, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The VAE's latents in 2x2 patches, normalised by its batch-norm statistics (Flux2Pipeline's rule)."""
        from diffusers import Flux2Pipeline

        moments = vae.encode(pixels).latent_dist
        latents = moments.mean if generator is None else moments.sample(generator)
        patched = Flux2Pipeline._patchify_latents(latents)
        mean, std = _batch_norm_statistics(vae, patched)
        return ((patched - mean) / std).float()

    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        from diffusers import Flux2Pipeline

        latents = latents.to(vae.dtype)
        mean, std = _batch_norm_statistics(vae, latents)
        return vae.decode(Flux2Pipeline._unpatchify_latents(latents * std + mean)).sample

    def lora_state_dict(self, path, models):
        # kohya's `lora_down`/`lora_up` and ai-toolkit's `diffusion_model.` files with BFL's block names, LoKr, ...
        # converted by diffusers; it returns the state alone: alphas are folded in, or scale 1.
        return self.pipeline_class().lora_state_dict(str(path)), None

    def encode_text(self, model: LoadedModel, prompts: list[str], *, max_token_length: int, clip_skip: int):
        from training.prompts import TextConditioning

        states, _ = model.pipeline.encode_prompt(
            list(prompts), device=model.text_encoder.device, max_sequence_length=FLUX2_TEXT_TOKENS
        )
        return TextConditioning(states.float())

    def objective(self, model: LoadedModel, config: TrainingConfig) -> Flux2Flow:
        return Flux2Flow(model, config)

    def guidance_embedded(self, model: LoadedModel) -> bool:
        """FLUX.2-dev takes the guidance scale as an input (distilled guidance)."""
        return bool(model.denoiser.config.guidance_embeds)

    def sample_latents(self, model: LoadedModel, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Flux2Pipeline returns its latents as tokens (batch, h x w, channels), row by row: back to a grid."""
        factor = model.vae_scale_factor
        return latents.permute(0, 2, 1).reshape(len(latents), -1, height // factor, width // factor)

    def base_model_version(self, model: LoadedModel) -> str:
        return "flux2"

    def modelspec_architecture(self, model: LoadedModel) -> str:
        return "flux-2-dev"

    def tiny_pipeline(self, spec: TinySpec):
        """A Flux2Transformer2DModel with one double- and one single-stream block; a Mistral3 encoder of 31 layers
        (the pipeline stacks layers 10, 20 and 30) 16 wide, with a one-layer Pixtral vision tower it never calls,
        over a byte-level fast tokenizer with Mistral's chat markers and template (the pipeline only applies the
        template, which a fast tokenizer does without torchvision); a 16-channel AutoencoderKLFlux2 with seeded
        batch-norm statistics, so that their normalisation counts (its sample size 64 is the native resolution);
        FLUX's dynamic scheduler shift."""
        import torch
        from diffusers import (
            AutoencoderKLFlux2,
            FlowMatchEulerDiscreteScheduler,
            Flux2Pipeline,
            Flux2Transformer2DModel,
        )

        tokenizer = mistral_chat_tokenizer()
        width = 16
        torch.manual_seed(spec.seed)
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=16 * 4,  # 2x2 patches of the 16-channel latents
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=3 * width,  # three layers' states side by side
            timestep_guidance_channels=256,
            axes_dims_rope=(4, 4, 4, 4),  # sums to the head dimension
        )
        torch.manual_seed(spec.seed + 1)
        vae = AutoencoderKLFlux2(
            sample_size=64,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=8,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        with torch.no_grad():
            vae.bn.running_mean.copy_(torch.rand(64) - 0.5)
            vae.bn.running_var.copy_(torch.rand(64) + 0.5)
        torch.manual_seed(spec.seed + 2)
        text_encoder = _tiny_mistral3(tokenizer, width)
        return Flux2Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )


FLUX2 = Flux2()


class Flux2Flow(RectifiedFlow):
    """FLUX.2's transformer: the patched latents as tokens with their (t, h, w, l) ids, the caption's ids, sigma as
    the timestep and the guidance input at FLUX's TRAINING_GUIDANCE; it returns the velocity as tokens."""

    def image_tokens(self, latents: torch.Tensor) -> int:
        """One token per latent: they are 2x2 patches already."""
        return latents.shape[2] * latents.shape[3]

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
        import torch
        from diffusers import Flux2Pipeline

        device = self.model.device
        count, channels, height, width = noisy.shape
        text = batch.conditioning.to(device, dtype)
        guidance = (
            torch.full((count,), TRAINING_GUIDANCE, device=device, dtype=torch.float32)
            if self.model.guidance_embedded
            else None
        )
        velocity = self.model.denoiser(
            hidden_states=Flux2Pipeline._pack_latents(noisy.to(dtype)),
            encoder_hidden_states=text,
            timestep=sigmas.to(dtype),  # sigma in (0, 1): the pipeline passes timestep / 1000
            img_ids=Flux2Pipeline._prepare_latent_ids(noisy).to(device),
            txt_ids=Flux2Pipeline._prepare_text_ids(text).to(device),
            guidance=guidance,
            return_dict=False,
        )[0]
        return velocity.permute(0, 2, 1).reshape(count, channels, height, width)  # _pack_latents undone


def _batch_norm_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's batch-norm running mean and standard deviation (with its eps) of the patched latents, shaped
    (1, C, 1, 1) to broadcast on `like`."""
    import torch

    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


# Mistral's special tokens, in its order: the tiny tokenizer's ids 0-10, which the encoder's config names.
MISTRAL_SPECIALS = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
)


def mistral_chat_tokenizer():
    """A fast byte-level BPE tokenizer built offline: Mistral's special tokens, then every byte symbol, no merges;
    with the chat template of Mistral-Small-3.1 for the system and user messages Flux2Pipeline formats (their
    content as a string or a list of text parts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from training.models.builtin import byte_symbols

    vocab = {token: i for i, token in enumerate(MISTRAL_SPECIALS)}
    for symbol in byte_symbols():
        vocab[symbol] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(list(MISTRAL_SPECIALS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% set text = m['content'] if m['content'] is string else "
        "m['content'] | map(attribute='text') | join('') %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}"
        "[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]{% else %}{{ text }}{{ eos_token }}"
        "{% endif %}{% endfor %}"
    )
    return tokenizer


def _tiny_mistral3(tokenizer, width: int):
    """A Mistral3ForConditionalGeneration of 31 layers `width` wide over `tokenizer` (ids of <s>, </s>, <pad> and
    [IMG] in its config), with a one-layer Pixtral vision tower, which Flux2Pipeline never calls."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    return Mistral3ForConditionalGeneration(
        Mistral3Config(
            text_config=dict(
                model_type="mistral",
                vocab_size=len(tokenizer),
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=31,  # Flux2Pipeline stacks the states of layers 10, 20 and 30
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=1024,
                rope_theta=1e9,  # Mistral-Small-3.1's
                sliding_window=None,
                bos_token_id=ids("<s>"),
                eos_token_id=ids("</s>"),
                pad_token_id=ids("<pad>"),
            ),
            vision_config=dict(
                model_type="pixtral",
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=16,
                image_size=32,
                patch_size=16,
                num_channels=3,
            ),
            image_token_index=ids("[IMG]"),
            vision_feature_layer=-1,
            spatial_merge_size=1,
            multimodal_projector_bias=False,
        )
    ).eval()
