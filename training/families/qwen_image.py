"""Qwen-Image (id qwen_image): a 20 B parameter MMDiT transformer trained with rectified flow, conditioned on the
last hidden states of Qwen2.5-VL-7B (a language model, 3584 wide) over a chat template, with its own 3-D VAE
(AutoencoderKLQwenImage: 16 latent channels, 8x, per-channel mean and std).

- Recognised by QwenImageTransformer2DModel in model_index.json (Qwen-Image 2.1's transformer is another class);
  the Edit and Layered pipelines, whose transformer also attends to an input image's latents, are refused.
  QwenImagePipeline has no single-file loader, and diffusers has no single-file kind for Qwen-Image: a single
  file is told by its transformer's keys (QWEN_IMAGE_KEYS) and needs base_model_config.
- Loading: the transformer can be loaded on its own, from a single file and/or with 8-bit weights (quantize_base);
  the language model's activations overflow fp16, so plans train in bf16.
- Captions: the language model's states with the template's first 34 tokens dropped (QwenImagePipeline.encode_prompt),
  up to 512 tokens, of each caption's own length: a batch pads them and masks the padding. Guidance is true
  classifier-free guidance with a negative prompt, through the pipeline's `true_cfg_scale`.
- Latents: the VAE sees one-frame videos (batch, 3, 1, h, w); its latents are normalised per channel by the
  config's latents_mean and latents_std, as the pipeline denormalises them before decoding.
- Objective: rectified flow; the transformer takes 2x2 latent patches and sigma in (0, 1) as its timestep, and
  returns the velocity noise - x0 in patches.
- LoRA: the attention projections of the image and text streams (480 layers), written in the diffusers layout with
  alpha folded into lora_B: diffusers' Qwen-Image loader misreads `.alpha` tensors beside a `transformer.`
  prefix, and ComfyUI reads this layout at scale 1 (research §4).
- The guide has no Qwen-Image row; QWEN_IMAGE_HARDWARE is an estimate from the real model's parameter counts on
  the meta device (tests/test_full_size.py): plans quantize the transformer to 8 bits, keep the text encoder
  off the GPU, checkpoint gradients and train at 768 px to fit 24 GB; samples render at true_cfg_scale 4.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from training.families.base import FROM_PARAMETER_COUNTS, HardwareRow, read_config
from training.families.flow import JOINT_ATTENTION_MODULES, FlowFamily, RectifiedFlow
from training.families.flux import FLUX_CAPTION_ELEMENTS

if TYPE_CHECKING:
    import torch

    from training.config import TrainingConfig
    from training.data.loader import Batch
    from training.models.builtin import TinySpec
    from training.models.loading import LoadedModel
    from training.models.source import ModelSource
    from training.prompts import TextConditioning

# The attention projections of the image stream and of the text stream in each of the 60 blocks: 480 layers,
# 2.9 M LoRA parameters per rank (ai-toolkit's and musubi-tuner's Qwen-Image targets). The blocks' MLPs
# (img_mlp.net.0.proj, img_mlp.net.2, txt_mlp.net.0.proj, txt_mlp.net.2) would add 3.7 M per rank: target_modules
# can name them where memory allows.
QWEN_IMAGE_TARGET_MODULES = JOINT_ATTENTION_MODULES
# The text tokens the pipeline renders with (QwenImagePipeline.__call__'s max_sequence_length): captions train alike.
QWEN_IMAGE_TEXT_TOKENS = 512
# What diffusers' single-file inference has no kind for (it would read the file as SD 1.x, "v1"): a Qwen-Image (v1)
# transformer, told by keys only it has, bare (diffusers' and ComfyUI's names are the same) or under ComfyUI's
# `model.diffusion_model.` prefix (2.1's text norm is `txt_in.text_norm`, a kind diffusers has).
QWEN_IMAGE_CHECKPOINT = "qwen-image"
QWEN_IMAGE_KEYS = ("txt_norm.weight", "transformer_blocks.0.img_mod.1.weight")
COMFYUI_PREFIX = "model.diffusion_model."
# The model card's 1:1 size; its VAE config records none.
QWEN_IMAGE_NATIVE = 1328
# Estimates, no GPU was measured (the guide has no row). Meta-device counts: transformer 20.43 B parameters, 20.4 GB
# in 8 bits (40.9 GB in bf16); Qwen2.5-VL-7B 8.29 B + VAE 0.13 B, 16.8 GB in bf16. Activations at 1328 px scaled
# from FLUX's row by image tokens (6889 against 4096) and blocks (60 against 57): ~10.6 GB, so 48 GB recommended.
# With the plan's 8-bit transformer, low_vram, gradient checkpointing, Adafactor and 768 px: 20.4 + ~0.2 (LoRA)
# + 10.6 x (768 / 1328)^2 x 0.75 (~2.7) = ~23.1 GB, the 24 GB minimum. Time: FLUX's 60-120 min x 20.4 / 11.9.
QWEN_IMAGE_HARDWARE = HardwareRow(
    QWEN_IMAGE_NATIVE,
    24,
    48,
    (100, 200),
    denoiser_gb=20.4,
    encoders_gb=16.8,
    quantized=True,
    estimated=FROM_PARAMETER_COUNTS,
)
# Where the built-in's VAE config records its native size: AutoencoderKLQwenImage takes no sample_size, and diffusers
# keeps a private (`_`) key in the loaded config without warning on every load that it is unexpected.
SIZE_KEY = "_sample_size"
# The resolution plans train at: 768 px is 2304 image tokens, a third of native's 6889 (activations with them).
QWEN_IMAGE_PLAN_RESOLUTION = 768


class QwenImage(FlowFamily):
    id = "qwen_image"
    described = "a Qwen-Image"
    name = "Qwen-Image"
    hardware = QWEN_IMAGE_HARDWARE
    told_by_size = False
    sample_guidance = 4.0  # true_cfg_scale, as the model card renders
    memory_precision = "bf16"  # the language model's activations overflow fp16
    plan_quantize_reason = (
        "8bit: Qwen-Image's 20 B transformer is ~41 GB in bf16 and ~20 GB in 8 bits, the only way it fits a 24 GB "
        "GPU (an estimate from its parameter counts, not measured); the LoRA still trains in full precision. It "
        "needs bitsandbytes (CUDA) or torchao installed; set quantize_base none on an 80 GB GPU"
    )
    # What else plans set to fit the 24 GB estimate (QWEN_IMAGE_HARDWARE), for a real-size model.
    plan_settings: ClassVar[Mapping[str, tuple[object, str]]] = {
        "low_vram": (
            True,
            "Qwen-Image's text encoder (Qwen2.5-VL, 8.3 B parameters, 16.6 GB in bf16) stays on the CPU: captions "
            "are encoded once and their states cached, so it never takes GPU memory (slow on the CPU, but once)",
        ),
        "gradient_checkpointing": (
            True,
            "the 60 blocks' activations are recomputed in the backward pass instead of kept: with the 8-bit "
            "transformer's ~20 GB, what fits 24 GB (an estimate, not measured)",
        ),
        "resolution": (
            QWEN_IMAGE_PLAN_RESOLUTION,
            f"{QWEN_IMAGE_PLAN_RESOLUTION} px, below Qwen-Image's native {QWEN_IMAGE_NATIVE}: a third of the image "
            "tokens and of their activations, which a 24 GB GPU needs (an estimate: ~23 GB); raise it on a larger GPU",
        ),
    }
    caption_elements = FLUX_CAPTION_ELEMENTS  # natural-language captions read by a language model, as FLUX's T5
    caption_example = "three-quarter view, in a medieval castle, torch lighting"
    denoiser_class = "QwenImageTransformer2DModel"
    fp16_overflows = ("vae", "text_encoder")  # the language model's activations, as T5's; the VAE as every other
    lora_target_modules = QWEN_IMAGE_TARGET_MODULES
    text_encoder_refusal = "its text encoder is the 8 B Qwen2.5-VL language model"
    clip_skip_note = "its text encoder is not CLIP"
    caption_reader = f"Qwen2.5-VL (up to {QWEN_IMAGE_TEXT_TOKENS} tokens) anyway"
    checkpoint_types = (QWEN_IMAGE_CHECKPOINT,)
    kohya_layout_refusal = (
        "kohya's layout is not written for Qwen-Image: use diffusers or comfyui (the same file), which ComfyUI and "
        "diffusers load"
    )
    single_file_example = "Qwen/Qwen-Image"  # QwenImagePipeline has no single-file loader
    fold_alpha = True
    guidance_argument = "true_cfg_scale"  # its guidance_scale is for guidance-distilled transformers only
    releases_text_encoders = True  # Qwen2.5-VL: 8.3 B parameters, 16.6 GB of memory in bf16 once captions are cached
    empty_negative_prompt = ""  # QwenImagePipeline guides only with a negative prompt: none is no guidance

    def named_by(self, name: str) -> bool:
        return any(word in name for word in ("qwen-image", "qwen_image", "qwenimage"))

    def default_optimizer(self) -> tuple[str, str]:
        return "adafactor", (
            "adafactor for Qwen-Image: its 8-bit 20 B transformer takes ~20 GB of a 24 GB GPU, and Adafactor "
            "'uses less memory than AdamW' (the guide's Memory Optimization) with no extra package"
        )

    def recognises(self, index: Mapping, folder: Path) -> bool:
        return "QwenImageTransformer2DModel" in str(index.get("transformer"))

    def checkpoint_kind(self, header) -> str | None:
        return QWEN_IMAGE_CHECKPOINT if qwen_image_checkpoint(header) else None

    def conflicts(self, config: TrainingConfig) -> tuple[list[str], list[str]]:
        """FlowFamily's, and shuffled captions: they cannot be cached, so the 8.3 B Qwen2.5-VL encodes every
        batch (on the CPU under low_vram, seconds a caption)."""
        errors, warnings = super().conflicts(config)
        if config.shuffle_captions:
            warnings.append(
                "shuffle_captions: shuffled captions cannot be encoded once and cached, so Qwen-Image's 8.3 B text "
                "encoder runs at every step (on the CPU under low_vram: seconds per caption); Qwen-Image reads "
                "sentences, not tag lists: set shuffle_captions to false"
            )
        return errors, warnings

    def refusal(self, source: ModelSource) -> str | None:
        """A single file without base_model_config (it holds the transformer only, and QwenImagePipeline has no
        single-file loader) or with ComfyUI's key prefix (diffusers reads Qwen-Image files by their bare names), or
        an Edit / Layered model, whose transformer also attends to an input image."""
        if refusal := super().refusal(source):
            return refusal
        if source.kind == "single_file" and _comfyui_prefixed(source.path):
            return (
                f"{source.path} names its tensors with ComfyUI's `{COMFYUI_PREFIX}` prefix, which diffusers' "
                "Qwen-Image single-file loader does not strip: train on the diffusers folder (e.g. Qwen/Qwen-Image), "
                "or on the same weights saved with bare names (transformer_blocks.0.attn.to_q.weight, ...)"
            )
        folder = source.config_folder if source.kind == "single_file" else source.path
        try:
            pipeline = str(read_config(folder / "model_index.json").get("_class_name", ""))
        except (OSError, ValueError, AttributeError):
            return None  # loading says what is missing
        if "Edit" in pipeline or "Layered" in pipeline:
            return (
                f"{source.path} is a {pipeline} model, which edits or layers an input image; this trainer trains "
                "text-to-image Qwen-Image LoRAs (Qwen/Qwen-Image and its fine-tunes)"
            )
        return None

    def geometry(self, vae: Mapping, denoiser: Mapping) -> tuple[int, int] | None:
        """The VAE's config records no size for the real model (1328 px native, the model card's 1:1 size); the
        built-in records its 64 px under SIZE_KEY. Buckets step by the VAE factor x 2, the 2x2 patches (16 px)."""
        factor = self.vae_scale_factor(vae)
        return (vae.get(SIZE_KEY) or QWEN_IMAGE_NATIVE, factor * 2) if factor is not None else None

    def vae_scale_factor(self, vae: Mapping) -> int | None:
        """2 per downsampling level, one per entry of `temperal_downsample` (the pipeline's own rule): 8."""
        levels = vae.get("temperal_downsample")
        return 2 ** len(levels) if levels else None

    def latent_channels(self, vae: Mapping) -> int:
        return vae["z_dim"]

    def encode_latents(self, vae, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The images as one-frame videos; latents normalised per channel (the img2img pipeline's rule)."""
        moments = vae.encode(pixels[:, :, None]).latent_dist
        latents = moments.mean if generator is None else moments.sample(generator)
        mean, std = _channel_statistics(vae, latents)
        return ((latents - mean) / std)[:, :, 0].float()

    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        frames = latents[:, :, None].to(vae.dtype)
        mean, std = _channel_statistics(vae, frames)
        return vae.decode(frames * std + mean).sample[:, :, 0]

    def prompt_arguments(self, positive: TextConditioning, negative: TextConditioning | None) -> dict:
        """States with their masks (the pipeline warns, and attends to padding, without them)."""
        arguments = {"prompt_embeds": positive.states, "prompt_embeds_mask": _mask(positive)}
        if negative is not None:
            arguments |= {"negative_prompt_embeds": negative.states, "negative_prompt_embeds_mask": _mask(negative)}
        return arguments

    def pipeline_class(self):
        from diffusers import QwenImagePipeline

        return QwenImagePipeline

    def lora_state_dict(self, path, models):
        # ai-toolkit's `diffusion_model.` files with alphas, kohya's `lora_unet_` names, ... converted by diffusers;
        # it returns the state alone: alphas are folded in, or scale 1.
        return self.pipeline_class().lora_state_dict(str(path)), None

    def encode_text(self, model: LoadedModel, prompts: list[str], *, max_token_length: int, clip_skip: int):
        """The pipeline's states, padded to the longest caption, and their mask (None where no caption is padded)."""
        from training.prompts import TextConditioning

        states, mask = model.pipeline.encode_prompt(
            prompts, device=model.text_encoder.device, max_sequence_length=QWEN_IMAGE_TEXT_TOKENS
        )
        return TextConditioning(states.float(), mask=mask)

    def objective(self, model: LoadedModel, config: TrainingConfig) -> QwenImageObjective:
        return QwenImageObjective(model, config)

    def sample_latents(self, model: LoadedModel, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipeline returns its latents in 2x2 patches; unpacked they are one-frame videos."""
        return model.pipeline._unpack_latents(latents, height, width, model.vae_scale_factor)[:, :, 0]

    def base_model_version(self, model: LoadedModel) -> str:
        return "qwen_image"

    def modelspec_architecture(self, model: LoadedModel) -> str:
        return "qwen-image"

    def tiny_pipeline(self, spec: TinySpec):
        """A QwenImageTransformer2DModel with two blocks; a two-layer Qwen2.5-VL over Z-Image's byte-vocabulary
        Qwen2 tokenizer; Qwen-Image's VAE at
        base_dim 8 (0.22 M parameters, the heaviest part at 16 and 2.6 M; its config's SIZE_KEY, 64, is the native
        resolution the trainer reads), with seeded per-channel latent statistics so that their normalisation
        counts; Qwen-Image's own scheduler settings (dynamic exponential shift, terminal sigma 0.02)."""
        import torch
        from diffusers import (
            AutoencoderKLQwenImage,
            FlowMatchEulerDiscreteScheduler,
            QwenImagePipeline,
            QwenImageTransformer2DModel,
        )

        from training.families.z_image import qwen_chat_tokenizer

        # Qwen's chat markers and the vision markers the model's config names (the pipeline formats its own
        # template and never calls the vision tower)
        tokenizer = qwen_chat_tokenizer(("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"))
        width = 32
        torch.manual_seed(spec.seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16 * 4,  # 2x2 patches of the 16-channel latents
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=width,  # the language model's states
            guidance_embeds=False,  # as Qwen-Image
            axes_dims_rope=(4, 6, 6),  # sums to the head dimension
        )
        torch.manual_seed(spec.seed + 1)
        statistics = torch.rand(2, 16)
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 2, 2, 2],  # 3 downsamplings: 8x
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[round(v, 4) for v in (statistics[0] - 0.5).tolist()],
            latents_std=[round(v, 4) for v in (statistics[1] + 0.5).tolist()],
        )
        vae.register_to_config(**{SIZE_KEY: 64})
        torch.manual_seed(spec.seed + 2)
        text_encoder = _tiny_qwen25_vl(tokenizer, width)
        scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen/Qwen-Image's scheduler config
            base_image_seq_len=256,
            base_shift=0.5,
            max_image_seq_len=8192,
            max_shift=0.9,
            shift=1.0,
            shift_terminal=0.02,
            time_shift_type="exponential",
            use_dynamic_shifting=True,
        )
        return QwenImagePipeline(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer
        )


QWEN_IMAGE = QwenImage()


def qwen_image_checkpoint(keys) -> bool:
    """Whether a single file's tensor names are a Qwen-Image transformer's."""
    return any(all(prefix + key in keys for key in QWEN_IMAGE_KEYS) for prefix in ("", COMFYUI_PREFIX))


def _comfyui_prefixed(path: Path) -> bool:
    """Whether a .safetensors file's tensor names carry COMFYUI_PREFIX (its header read without torch)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return any(key.startswith(COMFYUI_PREFIX) for key in f.keys())
    except Exception:  # not a safetensors file: loading says why
        return False


class QwenImageObjective(RectifiedFlow):
    """Qwen-Image's transformer: latents in 2x2 patches with their grid size, sigma as the timestep, the caption
    states with their padding masked."""

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
        from diffusers import QwenImagePipeline

        factor, device = self.model.vae_scale_factor, self.model.device
        count, channels, height, width = noisy.shape
        packed = QwenImagePipeline._pack_latents(noisy.to(dtype), count, channels, height, width)
        mask = batch.text_mask
        # All ones is no mask: the pipeline passes None then, and so the same attention runs here.
        mask = None if mask is None or bool(mask.all()) else mask.to(device)
        velocity = self.model.denoiser(
            hidden_states=packed,
            timestep=sigmas.to(dtype),  # sigma in (0, 1): the pipeline passes timestep / 1000
            encoder_hidden_states=batch.conditioning.to(device, dtype),
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, height // 2, width // 2)]] * count,
            guidance=None,
            return_dict=False,
        )[0]
        return QwenImagePipeline._unpack_latents(velocity, height * factor, width * factor, factor)[:, :, 0]


def _channel_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE config's per-channel latents_mean and latents_std, shaped (1, C, 1, 1, 1) to broadcast on `like`."""
    import torch

    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


def _mask(conditioning: TextConditioning) -> torch.Tensor:
    """The conditioning's mask, all ones where it has none."""
    import torch

    if conditioning.mask is not None:
        return conditioning.mask
    return torch.ones(conditioning.states.shape[:2], dtype=torch.long, device=conditioning.states.device)


def _tiny_qwen25_vl(tokenizer, width: int):
    """A two-layer Qwen2.5-VL of hidden size `width` over `tokenizer` (its special tokens' ids in the config), with
    a one-block vision tower, which QwenImagePipeline never calls."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    special = {name: ids(f"<|{name}|>") for name in ("vision_start", "vision_end", "image_pad", "video_pad")}
    return Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=dict(
                hidden_size=width,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                vocab_size=len(tokenizer),
                # mrope_section sums to half the head dimension (16)
                rope_scaling={"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
                rope_theta=1e6,
                bos_token_id=None,
                eos_token_id=ids("<|im_end|>"),
            ),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=width),
            hidden_size=width,
            vocab_size=len(tokenizer),
            vision_start_token_id=special["vision_start"],
            vision_end_token_id=special["vision_end"],
            image_token_id=special["image_pad"],
            video_token_id=special["video_pad"],
            bos_token_id=None,
            eos_token_id=ids("<|im_end|>"),
        )
    ).eval()
