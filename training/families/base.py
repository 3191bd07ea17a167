"""The interface every model family implements: what the trainer does differently for SD 1.x/2.x,
SDXL or FLUX, asked of one object instead of `if family == ...` branches through the engine.

A family is asked five kinds of things, the first four in the order a run asks them:
1. recognising: does a diffusers folder (its model_index.json and component configs) or a single
   file's checkpoint type belong to it, and can it be trained (FLUX Fill/Control cannot);
2. loading and placing: the pipeline class and its options, which frozen parts stay fp32 under
   fp16, the training scheduler, the native resolution and bucket step;
3. training: encoding captions, the objective (what the denoiser predicts, at which noise levels),
   the layers a LoRA adapts, how samples are rendered;
4. writing: kohya's `ss_base_model_version` / `ss_v2` tags, the model spec's architecture, the file
   layouts it can be written in;
5. testing: a real pipeline of the family at toy size, which training/models/builtin.py saves as a
   built-in model (`builtin:tiny-*`);
and, before any of that, what the guide says of it: its "Required Hardware" and "Training Time" row, the
optimizer and precision plans choose, its sample guidance, the options it refuses or ignores, its caption
rules, and the words its models' names carry. The guide's cross-family tables (learning rates, ranks, strengths,
dataset sizes) are training/guide.py's.

Family modules are imported by the server, which never imports torch: torch and diffusers are
imported inside the methods that compute, never at module level.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline, SchedulerMixin

    from training.config import TrainingConfig
    from training.models.builtin import TinySpec
    from training.models.loading import LoadedModel
    from training.models.source import ModelSource
    from training.objectives import Objective
    from training.prompts import TextConditioning


@dataclass(frozen=True)
class HardwareRow:
    """A family's row of the guide's "Required Hardware" table, with the weights the memory estimate
    (training/estimates.py) splits off (public parameter counts, at 2 bytes per parameter unless `quantized`)."""

    native: int
    minimum_gb: float
    recommended_gb: float
    minutes_per_1k: tuple[float, float]  # the guide's "Training Time (1k steps)"
    denoiser_gb: float  # the UNet or transformer
    encoders_gb: float  # text encoder(s) + VAE: what low_vram keeps off the GPU
    quantized: bool = False  # weights stored in 8 bits, whatever mixed_precision says
    # How the row was made where the guide has none for the family (plans and pre-flight checks say it); None: the
    # guide's own row.
    estimated: str | None = None

    @property
    def from_guide(self) -> bool:
        return self.estimated is None


# How the rows of the families the guide has no row for are made (HardwareRow.estimated): the weights are the published
# configs' parameter counts (tests/test_full_size.py counts them on the meta device), the rest scaled from FLUX's row.
FROM_PARAMETER_COUNTS = (
    "estimated from the published model's parameter counts; the guide has no row for it, and no GPU run has checked it"
)

# Why plans train a family in its precision (ModelFamily.plan_precision), as the plan's reason says it.
PRECISION_REASONS = {
    "fp16": "fp16, as the guide's examples use: half the memory of fp32 for {name} on a CUDA GPU (the VAE "
    "stays fp32, LoRA weights train in fp32); on a CPU it runs too, slower than fp32",
    "bf16": "bf16 for {name}: its activations overflow fp16's range, bf16 keeps fp32's (an Ampere or newer "
    "GPU; on older ones use fp16, the VAE stays fp32 either way); on a CPU it runs too, slower than fp32",
}


class ModelFamily:
    """One family of base models. Subclasses set the class attributes and override what differs;
    an instance is registered in `training.families.FAMILIES` under its `id`."""

    id: str  # sd1, sd2, sdxl, flux: TrainingConfig.model_family's values and LoadedModel.family
    described: str  # as a sentence names it: "an SDXL" (model)
    name: str  # as the guide's tables name it: SD 1.5, SD 2.x, SDXL, FLUX
    denoiser_prefix: str  # the denoiser's pipeline component and LoRA-file prefix: unet or transformer
    # The denoiser's diffusers class (its config's _class_name): what tells apart the families that share a
    # prefix (every transformer family's LoRA files say `transformer.`).
    denoiser_class: str
    # The pipeline components that encode prompts (frozen, kept on the CPU by low_vram): SD 3.5 has three.
    text_encoders: tuple[str, ...] = ("text_encoder",)
    pooled_text: bool = False  # the conditioning has a pooled vector beside the token states (SDXL, FLUX, SD 3.5)
    # diffusers' names for single-file checkpoints of this family (single_file_utils.infer_diffusers_model_type)
    checkpoint_types: tuple[str, ...] = ()
    # Components kept fp32 when the frozen weights are stored in fp16: SD and SDXL VAEs overflow in fp16.
    fp16_overflows: tuple[str, ...] = ("vae",)
    lora_target_modules: tuple[str, ...]  # the denoiser's layers a LoRA adapts (module-name suffixes)
    lora_excluded_modules: str | None = None  # a full module name peft must leave alone
    uses_negative_prompt: bool = True  # classifier-free guidance with an empty negative prompt
    conditions_on_image_size: bool = False  # SDXL's size and crop ids
    text_states_on_cpu: bool = False  # cached caption states too large to keep on the GPU
    # The text encoders are dropped once every caption and sample prompt is encoded (where captions are static):
    # too large to keep in memory for nothing (Qwen-Image's 8.3 B Qwen2.5-VL).
    releases_text_encoders: bool = False
    sd_v2: bool = False  # kohya's ss_v2 tag
    # Why this family's LoRAs are not written in the kohya layout (None: they are), and what "comfyui" means.
    kohya_layout_refusal: str | None = None
    comfyui_layout: str = "kohya"  # also what a run writes unless output_format says
    # The diffusers layout with an `.alpha` tensor per module instead of the adapter config (what ComfyUI
    # reads for FLUX); the default is the adapter config in `lora_adapter_metadata`, as diffusers writes it.
    alpha_tensors: bool = False
    # Neither: alpha / rank multiplied into lora_B, no adapter config (the families whose diffusers loader refuses
    # both `.alpha` tensors and ComfyUI ignores the config: SD 3.5, Qwen-Image, Z-Image); read back, alpha = rank.
    fold_alpha: bool = False
    # The SAI model spec's `modelspec.implementation` of a LoRA, as kohya's sai_model_spec.py writes it.
    modelspec_implementation: str = "diffusers"
    pipeline_options: ClassVar[Mapping] = {}  # keyword arguments of from_pretrained / from_single_file
    guidance_argument: str = "guidance_scale"  # the pipeline's keyword for the guidance scale (Qwen: true_cfg_scale)
    # The pipeline's negative_prompt when a render names none: None, which SDXL reads as zeroed unconditional states;
    # Qwen-Image's "", since its pipeline guides only when given a negative prompt.
    empty_negative_prompt: str | None = None

    # What the guide says of it:
    hardware: HardwareRow
    # Whether a native size alone tells this family (the UNets' 512, 768, 1024 px); FLUX's 1024 is SDXL's too.
    told_by_size: bool = True
    sample_guidance: float = 7.5  # the guidance samples are rendered with unless the config says
    guidance_note: str = ""  # what tool descriptions add to its name beside sample_guidance (a variant's own)
    plan_precision: str = "bf16"  # the mixed precision plans train it in (PRECISION_REASONS says why)
    # The mixed precision of the guide's memory preset for it: fp16, unless its activations overflow fp16.
    memory_precision: str = "fp16"
    # Why plans load its frozen weights in 8 bits (its hardware row assumes them), or None: they do not.
    plan_quantize_reason: str | None = None
    # What else plans set for a real-size model of it, with why: config key -> (value, reason). Qwen-Image's 20 B
    # transformer fits 24 GB only with its encoder off the GPU, checkpointing and below its native size.
    plan_settings: ClassVar[Mapping[str, tuple[object, str]]] = {}
    # The caption elements the guide asks of this family's captions beyond trigger and subject:
    # element -> a pattern of words that show it (in lower case).
    caption_elements: ClassVar[Mapping[str, str]] = {}
    caption_example: str = ""  # words that show every caption element, as lint-captions suggests them

    # --- 0. what the guide says of it -------------------------------------------------------------
    def named_by(self, name: str) -> bool:
        """Whether a model's name (lower case) says it is of this family, where its files cannot tell."""
        return False

    def hardware_of(self, model_name: str) -> HardwareRow:
        """The row of a model of this family named `model_name`: `hardware`, unless the family's variants differ
        in size by more than a row holds (SD 3.5 Large is 3.6x Medium)."""
        return self.hardware

    def default_optimizer(self) -> tuple[str, str]:
        """The optimizer plans train it with, and why."""
        return "adamw", f"adamw, the guide's default and the optimizer of its examples, for {self.name}"

    def default_precision(self) -> tuple[str, str]:
        """The mixed precision plans train it in, and why."""
        return self.plan_precision, PRECISION_REASONS[self.plan_precision].format(name=self.name)

    def conflicts(self, config: TrainingConfig) -> tuple[list[str], list[str]]:
        """(errors, warnings) of the config's options that do not fit this family."""
        return [], []

    # --- 1. recognising it from its files ---------------------------------------------------------
    def recognises(self, index: Mapping, folder: Path) -> bool:
        """Whether the diffusers folder with this model_index.json is of this family (configs only)."""
        raise NotImplementedError

    def checkpoint_kind(self, header: Mapping[str, torch.Tensor]) -> str | None:
        """The kind of a single file whose tensors (`header`: name -> meta tensor) only this family reads, where
        diffusers' own inference has no kind for it (and would answer another's), or None."""
        return None

    def recognises_checkpoint(self, kind: str) -> bool:
        """Whether a single file of diffusers' checkpoint type `kind` is of this family."""
        return kind in self.checkpoint_types

    def refusal(self, source: ModelSource) -> str | None:
        """Why a model of this family cannot be trained, from its files alone (no weights), or None."""
        return None

    def geometry(self, vae: Mapping, denoiser: Mapping) -> tuple[int, int] | None:
        """(native resolution, bucket step) from the VAE's and the denoiser's configs (config.json or a
        loaded component's .config); None when they do not say."""
        raise NotImplementedError

    # --- 2. loading and placing -------------------------------------------------------------------
    def pipeline_class(self) -> type[DiffusionPipeline]:
        raise NotImplementedError

    def lora_state_dict(self, path: Path, models: Mapping[str, torch.nn.Module]) -> tuple[dict, dict | None]:
        """A LoRA file as diffusers' own loader reads it for this family (kohya/A1111 names, LoCon conv layers,
        ... converted to diffusers names) and its network alphas by key (None: scale 1). The UNet's config
        lets diffusers map kohya's SGM block names (SDXL's input_blocks_4_1_...) onto the diffusers ones."""
        return self.pipeline_class().lora_state_dict(str(path), unet_config=models[self.denoiser_prefix].config)

    def load_pipeline(
        self, source: ModelSource, device: torch.device, dtypes: dict[str, torch.dtype], *, quantize: str
    ) -> DiffusionPipeline:
        """The pipeline, its frozen weights read straight into `dtypes` (a single file: all in the main
        type; load_base_model casts the rest after)."""
        pipeline_class = self.pipeline_class()
        if source.kind == "single_file":
            config = str(source.config_folder) if source.config_folder else None
            return pipeline_class.from_single_file(
                str(source.path), config=config, local_files_only=True, dtype=dtypes["default"], **self.pipeline_options
            )
        return pipeline_class.from_pretrained(str(source.path), dtype=dtypes, **self.pipeline_options)

    def vae_scale_factor(self, vae: Mapping) -> int | None:
        """Pixels per latent, from the VAE's config (None: it does not say)."""
        return vae_factor(vae)

    def latent_channels(self, vae: Mapping) -> int:
        """Channels of the latents the denoiser sees, from the VAE's config."""
        return vae["latent_channels"]

    def encode_latents(self, vae, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Latents of `pixels` (batch, 3, h, w in [-1, 1], the VAE's device and type) as the denoiser sees them,
        in fp32: a sample of the VAE's distribution drawn with `generator`, or its mean when None (validation),
        shifted and scaled as the VAE's config says (AutoencoderKL's scaling_factor, FLUX's shift_factor)."""
        moments = vae.encode(pixels).latent_dist
        latents = moments.mean if generator is None else moments.sample(generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] of latents as `encode_latents` gives them (the pipeline's output_type="latent",
        after `sample_latents`)."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample

    def prompt_arguments(self, positive: TextConditioning, negative: TextConditioning | None) -> dict:
        """The pipeline's keyword arguments for encoded prompts (and the encoded empty negative prompt where
        `uses_negative_prompt`): the states, and the pooled vectors where the family has them."""
        arguments = {"prompt_embeds": positive.states}
        if positive.pooled is not None:
            arguments["pooled_prompt_embeds"] = positive.pooled
        if negative is not None:
            arguments["negative_prompt_embeds"] = negative.states
            if negative.pooled is not None:
                arguments["negative_pooled_prompt_embeds"] = negative.pooled
        return arguments

    def loaded_sample_guidance(self, pipeline: DiffusionPipeline) -> float:
        """The guidance a loaded model renders at unless asked otherwise: `sample_guidance`, unless the family's
        variants differ (Z-Image: Turbo is distilled to render without guidance, the base model with)."""
        return self.sample_guidance

    def check_loaded(self, pipeline: DiffusionPipeline, source: ModelSource) -> str | None:
        """Why the loaded pipeline cannot be trained after all (what only its loaded parts say), or None."""
        return None

    def loaded_id(self, pipeline: DiffusionPipeline) -> str:
        """The family the loaded model is: this one, unless the loaded configs tell a sibling apart."""
        return self.id

    def training_scheduler(self, pipeline: DiffusionPipeline) -> SchedulerMixin:
        """The scheduler training draws noise levels from, from the model's own scheduler config."""
        raise NotImplementedError

    # --- 3. training ------------------------------------------------------------------------------
    def encode_text(
        self, model: LoadedModel, prompts: list[str], *, max_token_length: int, clip_skip: int
    ) -> TextConditioning:
        raise NotImplementedError

    def objective(self, model: LoadedModel, config: TrainingConfig) -> Objective:
        raise NotImplementedError

    def prediction_type(self, model: LoadedModel) -> str:
        """epsilon or v_prediction (DDPM), flow_matching (rectified flow: the velocity noise - image)."""
        raise NotImplementedError

    def guidance_embedded(self, model: LoadedModel) -> bool:
        """Whether the model takes the guidance scale as an input (guidance distillation)."""
        return False

    def lora_models(self, model: LoadedModel) -> dict[str, torch.nn.Module]:
        """The models a LoRA may adapt, by their prefix in LoRA files."""
        raise NotImplementedError

    def meta_lora_models(self, folder: Path) -> dict[str, torch.nn.Module]:
        """`lora_models` of the diffusers `folder` as module trees without weights (on the meta device),
        from its configs: what converting and merging LoRA files match names against. OSError when a
        config is missing."""
        raise NotImplementedError

    def sample_latents(self, model: LoadedModel, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipeline's output_type="latent" images as the VAE decodes them."""
        return latents

    # --- 4. writing -------------------------------------------------------------------------------
    def base_model_version(self, model: LoadedModel) -> str:
        """kohya's `ss_base_model_version` tag."""
        raise NotImplementedError

    def modelspec_architecture(self, model: LoadedModel) -> str:
        """The SAI model spec's `modelspec.architecture` of the base model (the LoRA's adds `/lora`)."""
        raise NotImplementedError

    # --- 5. testing -------------------------------------------------------------------------------
    def tiny_pipeline(self, spec: TinySpec) -> DiffusionPipeline:
        """A pipeline of this family at toy size (64 px) with random weights, built deterministically from
        `spec.seed` out of training/models/builtin.py's shared tiny VAE and text encoder pieces."""
        raise NotImplementedError


def read_config(path: Path) -> dict:
    """A component's config.json; OSError or ValueError when it is missing or not JSON."""
    return json.loads(path.read_text(encoding="utf-8"))


def vae_factor(vae: Mapping) -> int | None:
    """Pixels per latent: 2 per VAE downsampling level (8 for SD, SDXL and FLUX); None for an empty config."""
    levels = vae["block_out_channels"]
    return 2 ** (len(levels) - 1) if levels else None
