"""Z-Image (id z_image: Z-Image-Turbo and the Z-Image base model): a 6 B parameter single-stream DiT (text and
image tokens in one sequence) trained with rectified flow, conditioned on the token states of a Qwen3-4B
language model.

- Recognised by ZImagePipeline or ZImageTransformer2DModel in model_index.json (not the ControlNet and Omni
  pipelines, which also condition on images), or by diffusers' single-file kind z-image-turbo (ComfyUI's
  layout of either model); a single file holds the transformer only, so it needs base_model_config. Turbo
  and base differ by their files only: Turbo's scheduler shift is 3, base's 6 (their scheduler_config.json).
- Loading: the transformer can be loaded on its own, from a single file and/or with 8-bit weights
  (quantize_base); under fp16 the Qwen3 encoder stays fp32 (a language model's activations overflow).
- Captions: the Qwen3 encoder's second-to-last hidden states of the caption in its chat template, up to 512
  tokens, pad tokens dropped, by ZImagePipeline.encode_prompt: one (tokens, 2560) tensor per caption, of
  its own length. Batches pad them to the longest with a mask; the transformer takes them as a list again.
- Objective: x_sigma = (1 - sigma) * x0 + sigma * noise; the transformer takes each image's latents as a
  (16, 1, h, w) frame and the timestep 1 - sigma (0 is pure noise), and predicts x0 - noise: the velocity
  noise - x0 is its output negated, as ZImagePipeline negates it before the scheduler step.
- LoRA: the attention projections of the 30 main blocks and the two noise and two caption refiner blocks;
  written as `transformer.<module>` with alpha / rank folded into lora_B: diffusers' Z-Image converter
  fails on `.alpha` tensors beside `transformer.` names and ComfyUI ignores the adapter config, so a folded
  file is the one both read at the trained strength.
- Turbo is step-distilled (8-9 steps without guidance): a LoRA trained on it directly wears that away, so
  the base model is the better one to train on. Not in the guide: its hardware row comes from the
  parameter counts; plans train in bf16 with AdamW; samples render as the loaded variant renders (Turbo
  at guidance 0, the base model at 4), with natural-language captions, as FLUX's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from training.families.base import FROM_PARAMETER_COUNTS, HardwareRow, read_config
from training.families.flow import FlowFamily, RectifiedFlow
from training.families.flux import FLUX_CAPTION_ELEMENTS

if TYPE_CHECKING:
    import torch

    from training.config import TrainingConfig
    from training.data.loader import Batch
    from training.models.builtin import TinySpec
    from training.models.loading import LoadedModel
    from training.prompts import TextConditioning

# The attention projections of every block (main, noise refiner, caption refiner): 4 x 34 = 136 layers of
# Z-Image's transformer, as diffusers' names them; the feed-forward layers (feed_forward.w1, w2, w3: 102 more)
# can be added with target_modules. peft matches the names as module-name suffixes.
ZIMAGE_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
# The caption's token count: ZImagePipeline's default max_sequence_length, as Z-Image was trained.
ZIMAGE_TEXT_TOKENS = 512
# The scheduler shifts of the released models (scheduler_config.json): Turbo 3.0, the base model 6.0.
BASE_SHIFT = 6.0
BASE_GUIDANCE = 4.0  # the base model's card: classifier-free guidance 3-5 over 28-50 steps
# Not in the guide: from the parameter counts at 2 bytes each. The transformer is 6.15 B parameters (12.3 GB);
# Qwen3-4B 4.02 B + VAE 0.08 B = 8.2 GB, which low_vram keeps off the GPU. Recommended: those 20.5 GB + a rank-32
# LoRA with AdamW (0.6 GB) + ~5 GB of activations at 1024 px (FLUX's 6.3 GB scaled by 34 blocks of 3840 against
# its 57 of 3072); minimum: the memory preset (text encoder on the CPU, checkpointing) on 16 GB. The time per
# 1k steps is half FLUX's, for half its transformer.
ZIMAGE_HARDWARE = HardwareRow(
    1024, 16, 26, (30, 60), denoiser_gb=12.3, encoders_gb=8.2, estimated=FROM_PARAMETER_COUNTS
)
# Names of Z-Image models: Z-Image, Z-Image-Turbo, z_image_turbo_bf16, zimage.
ZIMAGE_NAME = re.compile(r"(^|[^a-z0-9])z[-_ ]?image")


class ZImage(FlowFamily):
    id = "z_image"
    described = "a Z-Image"
    name = "Z-Image"
    hardware = ZIMAGE_HARDWARE
    told_by_size = False  # 1024 px, as SDXL
    sample_guidance = 0.0  # Turbo's model card: no classifier-free guidance (it is distilled into the model)
    guidance_note = f" Turbo (the base model: {BASE_GUIDANCE:g})"
    memory_precision = "bf16"  # Qwen3's activations overflow fp16
    caption_elements = FLUX_CAPTION_ELEMENTS  # a language model reads sentences: FLUX's caption elements
    caption_example = "three-quarter view, in a misty bamboo forest, soft morning light"
    denoiser_class = "ZImageTransformer2DModel"
    checkpoint_types = ("z-image-turbo",)  # diffusers' kind for ComfyUI's layout, Turbo's and base's alike
    fp16_overflows = ("vae", "text_encoder")
    lora_target_modules = ZIMAGE_TARGET_MODULES
    uses_negative_prompt = True  # the base model renders with classifier-free guidance; Turbo at 0 ignores it
    # text_states_on_cpu, as FlowFamily's: up to 512 x 2560 states, 5 MB per caption
    kohya_layout_refusal = (
        "kohya's Z-Image layout (the fused qkv of the original blocks) is not written: use diffusers or comfyui, "
        "the layout ComfyUI and diffusers load for Z-Image"
    )
    single_file_example = "Tongyi-MAI/Z-Image (or Tongyi-MAI/Z-Image-Turbo)"
    # comfyui_layout "diffusers", as FlowFamily's: `transformer.` names, which ComfyUI maps onto its Lumina2 model
    fold_alpha = True
    text_encoder_refusal = "its text encoder is the 4 B parameter Qwen3 language model"
    clip_skip_note = "its prompt states come from Qwen3"
    caption_reader = f"Qwen3 (up to {ZIMAGE_TEXT_TOKENS} tokens) anyway"

    def named_by(self, name: str) -> bool:
        return ZIMAGE_NAME.search(name) is not None

    def conflicts(self, config: TrainingConfig) -> tuple[list[str], list[str]]:
        """FlowFamily's, and a warning for Turbo as the base."""
        errors, warnings = super().conflicts(config)
        if configured_turbo(config):
            warnings.append(
                f"{config.model_name} is Z-Image-Turbo, distilled to render in 8-9 steps without guidance: a LoRA "
                "trained on it directly wears that distillation away (samples blur or lose detail at few steps "
                "as training goes on). The base model, Tongyi-MAI/Z-Image, is the better one to train on; keep "
                "steps and learning_rate low on Turbo"
            )
        return errors, warnings

    def recognises(self, index: Mapping, folder: Path) -> bool:
        """ZImagePipeline's transformer, but not in the ControlNet or Omni pipelines (a `controlnet` or `siglip`
        component): they condition on images too."""
        return self.denoiser_class in str(index.get("transformer")) and not {"controlnet", "siglip"} & set(index)

    def pipeline_class(self):
        from diffusers import ZImagePipeline

        return ZImagePipeline

    def loaded_sample_guidance(self, pipeline) -> float:
        return self.sample_guidance if is_turbo(pipeline) else BASE_GUIDANCE

    def lora_state_dict(self, path, models):
        # diffusers converts ai-toolkit's and kohya-style files (`diffusion_model.`, `lora_unet_`, with alphas)
        # with their alphas folded in, and returns none: scale 1.
        return self.pipeline_class().lora_state_dict(str(path)), None

    def encode_text(self, model: LoadedModel, prompts: list[str], *, max_token_length: int, clip_skip: int):
        """Each caption's states (pad tokens dropped), padded with zeros to the batch's longest, and the mask
        of each one's own tokens."""
        import torch

        from training.prompts import TextConditioning

        # encode_prompt writes the chat-templated captions into the list it is given: a copy.
        states, _ = model.pipeline.encode_prompt(
            list(prompts),
            device=model.text_encoder.device,
            do_classifier_free_guidance=False,
            max_sequence_length=ZIMAGE_TEXT_TOKENS,
        )
        longest = max(len(s) for s in states)
        padded = torch.zeros(len(states), longest, states[0].shape[-1])
        mask = torch.zeros(len(states), longest, dtype=torch.long)
        for row, caption in enumerate(states):
            padded[row, : len(caption)] = caption.float()
            mask[row, : len(caption)] = 1
        return TextConditioning(padded, None, mask)

    def prompt_arguments(self, positive: TextConditioning, negative: TextConditioning | None) -> dict:
        """ZImagePipeline takes a list of per-caption states (and of the negative prompt's, for guidance > 0)."""
        arguments = {"prompt_embeds": caption_states(positive.states, positive.mask)}
        if negative is not None:
            arguments["negative_prompt_embeds"] = caption_states(negative.states, negative.mask)
        return arguments

    def objective(self, model: LoadedModel, config: TrainingConfig) -> ZImageFlow:
        return ZImageFlow(model, config)

    def base_model_version(self, model: LoadedModel) -> str:
        return "z_image"

    def modelspec_architecture(self, model: LoadedModel) -> str:
        """Turbo or the base model, by the scheduler's shift (3 and 6 in their scheduler_config.json)."""
        return "z-image-turbo" if is_turbo(model.pipeline) else "z-image"

    def tiny_pipeline(self, spec: TinySpec):
        """A ZImageTransformer2DModel of two main blocks and one refiner of each kind, a two-layer Qwen3 encoder
        over a byte-level Qwen tokenizer with the chat template, the 16-channel VAE with Z-Image's (FLUX's)
        scaling and shift, and Turbo's scheduler shift 3. Its VAE's sample size 64 is the native resolution."""
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

        from training.models.builtin import tiny_flux_vae

        tokenizer = qwen_chat_tokenizer()
        width = 32
        torch.manual_seed(spec.seed)
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=width,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=width,  # the text encoder's width
            axes_dims=[4, 6, 6],  # sums to the head dimension
            axes_lens=[256, 32, 32],
        )
        with torch.no_grad():  # created uninitialised (torch.empty): NaNs in the padding otherwise
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()
        vae = tiny_flux_vae(spec.seed + 1)  # Z-Image's VAE is FLUX's
        torch.manual_seed(spec.seed + 2)
        text_encoder = Qwen3Model(
            Qwen3Config(
                hidden_size=width,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=16,
                vocab_size=len(tokenizer),
                max_position_embeddings=ZIMAGE_TEXT_TOKENS,
            )
        ).eval()
        return ZImagePipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # Turbo's
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )


Z_IMAGE = ZImage()


def configured_turbo(config: TrainingConfig) -> bool:
    """Whether a config trains on Z-Image-Turbo: by its scheduler's shift where the model's folder is here (a
    local folder, a single file's base_model_config, a cached hub id), else by its name."""
    from training.models.source import ModelNotFoundError, cached_snapshot

    named = "turbo" in config.model_name.lower()
    folder = Path(config.base_model_config or config.model_name).expanduser()
    if not folder.is_dir():
        try:
            folder = cached_snapshot(config.model_name)
        except ModelNotFoundError:  # not a hub id either: validation says so
            return named
    if folder is None:  # a hub id not downloaded yet
        return named
    try:
        scheduler = read_config(folder / "scheduler" / "scheduler_config.json")
        return float(scheduler.get("shift", BASE_SHIFT)) < BASE_SHIFT
    except (OSError, ValueError, TypeError, AttributeError):  # not a diffusers folder: loading says why
        return named


def is_turbo(pipeline) -> bool:
    """Whether a loaded Z-Image pipeline is Turbo (scheduler shift 3) rather than the base model (6)."""
    return float(pipeline.scheduler.config.get("shift", BASE_SHIFT)) < BASE_SHIFT


def caption_states(states: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """The per-caption states the transformer takes, from a padded batch and its mask (None: all tokens)."""
    if mask is None:
        return list(states.unbind(0))
    return [caption[keep.to(caption.device).bool()] for caption, keep in zip(states, mask)]


def qwen_chat_tokenizer(extra_special: tuple[str, ...] = ()):
    """A Qwen2Tokenizer built offline: every byte symbol as a token and no merges, the chat markers (and
    `extra_special`) as special tokens, <|endoftext|> as padding, and the ChatML template the Qwen pipelines
    format prompts with (saved with the tokenizer as chat_template.jinja)."""
    from transformers import Qwen2Tokenizer

    from training.models.builtin import byte_symbols

    vocab = {symbol: i for i, symbol in enumerate(byte_symbols())}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *extra_special]})
    tokenizer.add_tokens(["<|endoftext|>"], special_tokens=True)
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


class ZImageFlow(RectifiedFlow):
    """Z-Image's transformer: a list of (channels, 1, h, w) latent frames, the timestep 1 - sigma, the list of
    per-caption states; its output negated is the velocity (ZImagePipeline's convention)."""

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
        import torch

        device = self.model.device
        captions = caption_states(batch.conditioning.to(device, dtype), batch.text_mask)
        frames = list(noisy.to(dtype).unsqueeze(2).unbind(0))
        out = self.model.denoiser(frames, 1 - sigmas.float(), captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)
