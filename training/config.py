"""The training configuration: with config_inputs.py (its first group of options), the only home of every
default.

Field names follow the LoRA training guide the product is built from (`rank`, `alpha`,
`test_prompts`, `prior_loss_weight`, ...), with the kohya names accepted where the guide
uses them (`network_dim`, `network_alpha`, `sample_prompts`, `prior_preservation_weight`).
Values that depend on the model or the dataset (`resolution`, `steps`) may be left out and
are filled in by `resolve()` once those are known; a run writes the resolved config.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from training.config_errors import ConfigError, describe_error
from training.config_inputs import TrainingInputs
from training.families import FAMILIES, default_guidances
from training.guide import (
    CAPTION_TOKENS,
    DEFAULT_LEARNING_RATE,
    LEARNING_RATES,
    PRODIGY_LR,
    RANK_TABLE,
    STANDARD_RANK,
    STEPS_PER_IMAGE,
    LoraType,
    derived_class_prompt,
    lr_text,
    span,
)

LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
Optimizer = Literal["adamw", "adamw8bit", "adafactor", "lion", "prodigy", "sgd"]
MixedPrecision = Literal["no", "fp16", "bf16"]
OutputFormat = Literal["kohya", "diffusers"]
LoraMetadata = Literal["full", "minimal", "none"]
# Caption tokens read: one CLIP chunk of 75 (the default), or two or three chunks (kohya's long captions).
MaxTokenLength = Literal[75, 150, 225]
AutoStop = Literal["divergence", "plateau", "no_effect", "memory_spill"]
TimestepSampling = Literal["uniform", "logit_normal", "shift"]
# Where else a run is logged (training/run_loggers.py); each is an optional extra of the project.
RunLogger = Literal["tensorboard", "wandb"]

# A name that is safe as one file name: configs, datasets, jobs and uploads (server/names.py) all use it.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class LoraShape:
    """The LoRA's rank and alpha as a config gives them, under the guide's names or kohya's."""

    rank: int
    alpha: float | None  # None: equal to rank
    rank_option: str  # the option that gave the rank: rank, or network_dim when the config has it
    alpha_option: str  # alpha, or network_alpha
    clashes: tuple[str, ...]  # both names given with different values, and which one wins


# Every option of a training run: the first ones (name, model, dataset, trigger words, images and caches) are
# declared in config_inputs.py, the rest here. No docstring: pydantic would put it into the options' schema.
class TrainingConfig(TrainingInputs):
    _lora: LoraShape = PrivateAttr()  # set by _fold_kohya_names, the one reader of network_dim / network_alpha

    # --- optimisation ----------------------------------------------------------------------
    steps: int | None = Field(
        None, ge=1, le=1_000_000, description="Optimizer steps; default 100 x the number of training images."
    )
    batch_size: int = Field(1, ge=1, le=256, description="Images per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=256, description="Micro-batches per optimizer step.")
    num_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Training processes on each machine, one per GPU (data parallel through HF Accelerate): each "
        "process trains on different images and only the LoRA's gradients are averaged between them. The global "
        "batch is batch_size x num_processes x num_machines x gradient_accumulation_steps; steps still counts "
        "optimizer steps. The server gives the job this many GPUs of its own.",
    )
    num_machines: int = Field(
        1,
        ge=1,
        le=64,
        description="Machines the job spans (each runs `lora-train` with the same config and its own "
        "--machine-rank, with --main-process-ip/--main-process-port naming machine 0). Only machine 0 writes "
        "the run's files.",
    )
    scale_lr: bool = Field(
        False,
        description="Multiply learning_rate (and text_encoder_lr) by the number of processes in all "
        "(num_processes x num_machines), so each image moves the LoRA about as much as on one process. Off by "
        "default: the learning rate you give is the one used, however many processes there are.",
    )
    learning_rate: float = Field(
        DEFAULT_LEARNING_RATE,
        gt=0.0,
        le=10.0,
        validation_alias=AliasChoices("learning_rate", "lr"),
        description=f"Peak learning rate: {lr_text(DEFAULT_LEARNING_RATE)} default, "
        f"{lr_text(LEARNING_RATES['conservative'][0])} conservative, {lr_text(LEARNING_RATES['fine_tuning'][0])} "
        f"fine-tuning; Prodigy wants {PRODIGY_LR}.",
    )
    text_encoder_lr: float | None = Field(
        None, gt=0.0, le=10.0, description="Learning rate of the text encoder LoRA; default learning_rate."
    )
    lr_scheduler: LrScheduler = Field("constant", description="Learning-rate schedule (diffusers' get_scheduler).")
    lr_warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up (not used by 'constant').")
    lr_scheduler_num_cycles: int = Field(
        3, ge=1, le=100, description="Cosine cycles of cosine_with_restarts (other schedules ignore it)."
    )
    optimizer: Optimizer = Field(
        "adamw", description="adamw8bit needs bitsandbytes, lion needs lion-pytorch, prodigy needs prodigyopt."
    )
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm; 0 disables clipping.")
    mixed_precision: MixedPrecision = Field(
        "no",
        description="fp16/bf16 autocast with the frozen weights in that type, on CUDA, Apple GPUs (MPS) and the CPU "
        "(slower than fp32 on most CPUs); LoRA weights stay fp32.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    low_vram: bool = Field(
        False,
        description="Keep the text encoders on the CPU (they encode each caption and prompt there; trained or "
        "shuffled-caption encoders stay on the GPU) and the VAE off the GPU except while it encodes or decodes "
        "(CUDA only; recorded only elsewhere: an Apple GPU shares the machine's memory).",
    )
    noise_offset: float = Field(
        0.0, ge=0.0, le=1.0, description="Per-channel noise offset (0.05-0.1 helps dark/bright images)."
    )
    min_snr_gamma: float | None = Field(
        None,
        gt=0.0,
        le=100.0,
        description="Min-SNR loss weighting gamma (5 is common); SD 1.x/2.x/SDXL only, not the flow-matching "
        "transformers (FLUX, SD 3.5, Chroma, Qwen-Image, Z-Image).",
    )
    timestep_sampling: TimestepSampling = Field(
        "shift",
        description="Flow-matching transformers only (FLUX, SD 3.5, Chroma, Qwen-Image, Z-Image): how noise levels "
        "are drawn. uniform; logit_normal (more "
        "mid-range noise levels, as SD3 trains); shift (logit-normal shifted towards high noise, as the "
        "model's own scheduler samples at this resolution).",
    )
    timestep_shift: float | None = Field(
        None,
        gt=0.0,
        le=100.0,
        description="Flow matching, timestep_sampling shift only: the shift s (sigma' = s*sigma / (1 + (s-1)*sigma)). "
        "Default: from the model's scheduler, by resolution (about 3.2 at 1024 px for FLUX.1-dev).",
    )
    quantize_base: Literal["none", "8bit"] = Field(
        "none",
        description="Transformer models (FLUX, Chroma, Qwen-Image, ...): load the frozen transformer with 8-bit "
        "weights (about half its bf16 memory; the LoRA "
        "still trains in full precision): bitsandbytes on CUDA, else torchao (pip install torchao).",
    )
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for LoRA init, data order, noise and samples.")

    # --- the LoRA --------------------------------------------------------------------------
    rank: int = Field(
        STANDARD_RANK,
        ge=1,
        le=1024,
        description=f"LoRA rank (dim): {span(RANK_TABLE[0][:2])} simple styles, {span(RANK_TABLE[1][:2])} standard, "
        f"{RANK_TABLE[2][0]}+ complex.",
    )
    alpha: float | None = Field(
        None, gt=0.0, le=4096, description="LoRA alpha; the update is scaled by alpha / rank. Default: equal to rank."
    )
    # kohya's names, declared so kohya configs load as they are; only _fold_kohya_names reads them.
    network_dim: int | None = Field(
        None, ge=1, le=1024, description="kohya name of rank; wins over rank when both are given."
    )
    network_alpha: float | None = Field(None, gt=0.0, le=4096, description="kohya name of alpha; wins over alpha.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout (0.1-0.3 against overfitting).")
    train_text_encoder: bool = Field(
        False, description="Also train a LoRA on the text encoder's attention (SD 1.x/2.x, SDXL and SD 3.5's CLIPs; "
        "not FLUX, Chroma, Qwen-Image or Z-Image).",
    )
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Layers of the UNet/transformer that get a LoRA, as module-name suffixes (e.g. 'to_q', "
        "'ff.net.2'; conv layers such as 'conv1' make a LoCon). Default: every attention projection (SD); attention, "
        "feed-forward and single-block MLP projections (FLUX, Chroma); the joint attention (SD 3.5, Qwen-Image, "
        "Z-Image).",
    )
    clip_skip: int = Field(
        1, ge=1, le=12, description="Use the text encoder's n-th layer from the end (2 for anime models)."
    )
    max_token_length: MaxTokenLength = Field(
        CAPTION_TOKENS,
        description=f"Caption tokens encoded (in {CAPTION_TOKENS}-token chunks, as kohya does); longer captions are "
        "cut.",
    )

    # --- DreamBooth-style prior preservation -----------------------------------------------
    prior_preservation: bool = Field(
        False, description="Train on generated class images too, so the class keeps its look."
    )
    prior_loss_weight: float = Field(
        1.0,
        ge=0.0,
        le=10.0,
        validation_alias=AliasChoices("prior_loss_weight", "prior_preservation_weight"),
        description="Weight of the class-image loss (alias prior_preservation_weight).",
    )
    instance_prompt: str | None = Field(
        None, description="Caption for images that have no .txt, e.g. 'xyz_person person'."
    )
    class_prompt: str | None = Field(
        None,
        description="Class images' prompt, e.g. 'a photo of a person'; default: from lora_type, else instance_prompt "
        "without the trigger word, else 'a photo of a <word>' for the class word (woman, man, dog, ...) that half of "
        "the captions name. A class image with its own .txt caption trains on that caption (as kohya's "
        "regularization images).",
    )
    class_data_dir: str | None = Field(
        None,
        description="Folder of class images; missing ones are generated into it with the base model. Default: the "
        "dataset's class/ images, never written to (the missing ones are generated into the run's class_images/).",
    )
    num_class_images: int = Field(
        100, ge=1, le=10_000, description="Class images used: those found first, the missing ones generated."
    )

    # --- validation and diagnostics ---------------------------------------------------------
    lora_type: LoraType | None = Field(
        None,
        description="What the LoRA is for (style, character, person, object, concept, complex_style, pose, "
        "details): sets the dataset-size advice of the diagnostics and the strengths recommended for use.",
    )
    validation_split: float = Field(
        0.0,
        ge=0.0,
        le=0.5,
        description="Share of the training images held out to score a validation loss when the dataset has no "
        "'validation' folder (0: none; 0.1-0.2 for 20+ images).",
    )
    validation_every: int = Field(
        100, ge=1, description="Score the held-out images every N steps (deterministic: fixed noise and timesteps)."
    )
    control_prompt: str | None = Field(
        None,
        description="A prompt without the trigger word, rendered with every set of samples to show style "
        "bleeding; default: the first test prompt with its trigger word removed.",
    )
    auto_stop_on: list[AutoStop] = Field(
        default_factory=list,
        description="Stop early (the reason in the status) when one holds at 3 checks validation_every steps apart: "
        "divergence (validation loss rising, training loss falling, or exploding gradients), plateau, no_effect (no "
        "change); or, every 10 steps, memory_spill (steps 3x slower while GPU memory is full: shared memory).",
    )

    # --- sampling, checkpoints, output ------------------------------------------------------
    test_prompts: list[str] = Field(
        default_factory=list,
        validation_alias=AliasChoices("test_prompts", "sample_prompts"),
        description="Prompts rendered before step 1 and every sample_every steps (alias sample_prompts).",
    )
    sample_every: int = Field(250, ge=1, description="Render test_prompts every N steps.")
    sample_steps: int = Field(20, ge=1, le=200, description="Denoising steps per sample image.")
    sample_timeout_s: float = Field(  # 900: twice a round of 5 FLUX images at 1024 px on a 12 GB card (~7 min)
        900.0, ge=0.0, description="Abandon a round of samples past this many seconds, with a warning; 0: no limit."
    )
    sample_guidance_scale: float | None = Field(
        None,
        ge=0.0,
        le=50.0,
        description=f"Guidance of sample images; default by model family: {default_guidances()}.",
    )
    disable_sampling: bool = Field(False, description="Skip sample images entirely (faster).")
    save_every: int = Field(250, ge=1, description="Save a resumable checkpoint every N steps.")
    keep_last_n_checkpoints: int = Field(3, ge=0, description="Checkpoints kept; older ones are deleted (0 keeps all).")
    resume_from: str | None = Field(
        None,
        description="Start from a previous LoRA: a run name, run directory, checkpoint or .safetensors file. "
        "A smaller rank is zero-padded to this rank (progressive training).",
    )
    output_format: OutputFormat | None = Field(
        None,
        description="kohya (ComfyUI, A1111/Forge) or diffusers (peft layout); both load in diffusers. Default: "
        "kohya for SD 1.x/2.x/SDXL, diffusers for the transformer models (the layout ComfyUI maps for them; "
        "kohya's layouts of those are not written).",
    )
    metadata: LoraMetadata = Field(
        "full",
        description="What the LoRA file tells about its training: full (kohya's ss_* keys, the model spec and this "
        "config, with names instead of local paths), minimal (rank, alpha, base-model version, trigger words, the "
        "model spec's title and architecture) or none (no metadata, like kohya's --no_metadata).",
    )
    log_with: list[RunLogger] = Field(
        default_factory=list,
        description="Also log loss, smoothed loss, validation loss, learning rate, gradient norm and the sample images "
        "to tensorboard (event files in the run's tensorboard/ folder: tensorboard --logdir <workspace>/runs) and/or "
        "wandb (Weights & Biases; project: the config's name, run: the run folder's name; WANDB_MODE=offline keeps "
        'it on disk). Each is an extra: pip install "lora-mcp[tensorboard]" / "lora-mcp[wandb]".',
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if ".." in value or not NAME_PATTERN.match(value):
            raise ValueError(
                "must be 1-100 letters, digits, '.', '_' or '-', start with a letter or digit, "
                "and contain no '/' or '..'"
            )
        return value

    @field_validator("test_prompts")
    @classmethod
    def _prompts_not_blank(cls, value: list[str]) -> list[str]:
        if any(not p.strip() for p in value):
            raise ValueError("prompts must not be empty")
        return value

    @field_validator("trigger_word")
    @classmethod
    def _trigger_is_one_tag(cls, value: str | None) -> str | None:
        return _check_trigger(value) if value is not None else None

    @field_validator("trigger_words")
    @classmethod
    def _triggers_are_one_tag(cls, value: dict[str, str]) -> dict[str, str]:
        return {folder: _check_trigger(word) for folder, word in value.items()}

    @model_validator(mode="after")
    def _fold_kohya_names(self) -> TrainingConfig:
        """The LoRA's shape from rank / alpha or kohya's network_dim / network_alpha: the kohya name wins
        when both are given (a kohya config pasted over the guide's defaults means kohya's values), and the
        clash is kept for warnings()."""
        clashes = []
        if self.network_dim is not None and self.network_dim != self.rank and "rank" in self.model_fields_set:
            clashes.append(f"rank={self.rank} and network_dim={self.network_dim} differ: network_dim wins")
        if self.network_alpha is not None and self.alpha is not None and self.network_alpha != self.alpha:
            clashes.append(f"alpha={self.alpha:g} and network_alpha={self.network_alpha:g} differ: network_alpha wins")
        rank_option = "network_dim" if self.network_dim is not None else "rank"
        alpha_option = "network_alpha" if self.network_alpha is not None else "alpha"
        self._lora = LoraShape(
            rank=getattr(self, rank_option),
            alpha=getattr(self, alpha_option),
            rank_option=rank_option,
            alpha_option=alpha_option,
            clashes=tuple(clashes),
        )
        return self

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> TrainingConfig:
        """pydantic's copy, which does not validate, with the LoRA's shape folded again from the copy's values."""
        return super().model_copy(update=update, deep=deep)._fold_kohya_names()

    @model_validator(mode="after")
    def _consistent(self) -> TrainingConfig:
        # Without lora_type the dataset's captions may still name the class: the run (and validate) decide.
        if self.prior_preservation and self.lora_type is not None and self.prior_class() is None:
            raise ValueError(_NO_CLASS)
        if self.crop == "random" and self.cache_latents:
            raise ValueError(
                "crop 'random' cannot be combined with cache_latents (a cached latent bakes in one crop): "
                "set crop to 'center' or cache_latents to false"
            )
        return self

    # --- derived values ----------------------------------------------------------------------
    @property
    def lora(self) -> LoraShape:
        return self._lora

    @property
    def effective_rank(self) -> int:
        return self._lora.rank

    @property
    def effective_alpha(self) -> float:
        return self._lora.alpha if self._lora.alpha is not None else float(self._lora.rank)

    def in_given_names(self, patch: dict[str, Any]) -> dict[str, Any]:
        """`patch` with rank and alpha under the names this config gives them (kohya's win, so a change
        to rank must change network_dim where the config has it)."""
        names = {"rank": self._lora.rank_option, "alpha": self._lora.alpha_option}
        return {names.get(key, key): value for key, value in patch.items()}

    @property
    def static_text(self) -> bool:
        """Captions map to fixed embeddings: the text encoder is frozen and tags are not shuffled."""
        return not self.train_text_encoder and not self.shuffle_captions

    @property
    def world_size(self) -> int:
        """Training processes in all, over every machine."""
        return self.num_processes * self.num_machines

    @property
    def effective_batch_size(self) -> int:
        """Images per optimizer step, over every process."""
        return self.batch_size * self.gradient_accumulation_steps * self.world_size

    def warnings(self, captions: Sequence[str] = ()) -> list[str]:
        """Things that are allowed but probably not what the user meant (`captions`: the dataset's, when known)."""
        found = list(self._lora.clashes)
        if self.cache_latents_to_disk and not self.cache_latents:
            found.append("cache_latents_to_disk has no effect while cache_latents is false")
        if self.cache_text_encoder_outputs_to_disk and not self.static_text:
            found.append(
                "cache_text_encoder_outputs_to_disk has no effect while captions are encoded every step "
                "(shuffle_captions or train_text_encoder is on)"
            )
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            found.append("lr_scheduler 'constant' ignores lr_warmup_steps: use 'constant_with_warmup'")
        if self.disable_sampling and self.test_prompts:
            found.append("disable_sampling is on: test_prompts will not be rendered")
        if self.prior_preservation and not self.class_prompt:
            derived = self.prior_class(captions)
            found.append(
                f"class_prompt not set: {derived[1]}; set class_prompt to choose"
                if derived
                else "class_prompt not set: the run takes it from the dataset's captions (a class word such as "
                "person, woman or dog that half of them name); set class_prompt to choose"
            )
        return found

    def prior_class(self, captions: Sequence[str] = ()) -> tuple[str, str] | None:
        """The class prompt prior preservation generates its class images with, and where it comes from."""
        return (self.class_prompt, "set") if self.class_prompt else derived_class_prompt(self, captions)

    def check_prior_class(self, captions: Sequence[str]) -> None:
        """Raise when prior preservation is on and neither the config nor the dataset's captions give a class."""
        if self.prior_preservation and self.prior_class(captions) is None:
            raise ConfigError([_NO_CLASS])

    def family_conflicts(self, family: str | None) -> tuple[list[str], list[str]]:
        """(errors, warnings) of options that do not fit the model family (sd1, sd2, sdxl, flux; None:
        unknown, nothing to say); each family says which (training/families/ `conflicts`)."""
        return FAMILIES[family].conflicts(self) if family is not None else ([], [])

    def resolve(
        self,
        *,
        native_resolution: int,
        num_images: int,
        family: str = "sd1",
        captions: Sequence[str] = (),
        sample_guidance: float | None = None,
    ) -> TrainingConfig:
        """The config a run actually uses: model- and dataset-dependent defaults filled in (the family's
        output format, the sample guidance of the loaded model (`sample_guidance`) or else of its family, the
        class prompt from the `captions`), and the kohya names folded into rank/alpha."""
        self.check_prior_class(captions)
        return self.model_copy(
            update={
                "resolution": self.resolution or native_resolution,
                "steps": self.steps or max(1, STEPS_PER_IMAGE * num_images),
                "output_format": self.output_format or FAMILIES[family].comfyui_layout,
                "sample_guidance_scale": next(
                    guidance
                    for guidance in (self.sample_guidance_scale, sample_guidance, FAMILIES[family].sample_guidance)
                    if guidance is not None
                ),
                "rank": self.effective_rank,
                "alpha": self.effective_alpha,
                "class_prompt": self.prior_preservation and self.prior_class(captions)[0] or self.class_prompt,
                "network_dim": None,
                "network_alpha": None,
            }
        )

    # --- YAML ------------------------------------------------------------------------------
    def to_yaml(self) -> str:
        import yaml  # here, not at import: the MCP server imports this module at start-up

        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError([describe_error(err, cls) for err in exc.errors()]) from None

    @classmethod
    def from_yaml(cls, text: str) -> TrainingConfig:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError([f"not valid YAML: {exc}"]) from None
        if not isinstance(data, dict):
            raise ConfigError(["the file must hold a mapping of option: value"])
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> TrainingConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"cannot read config file {path}: {exc.strerror}"]) from None
        return cls.from_yaml(text)


_NO_CLASS = (
    "prior_preservation needs a class and none is known: add class_prompt: 'a photo of a person' (your subject's "
    "class), or lora_type: person, character or object, or captions that name the class (half of them saying "
    "'woman', 'dog', ...), or set prior_preservation to false"
)


def _check_trigger(word: str) -> str:
    """A trigger word stays one caption tag: non-empty and without commas (tag shuffling splits on them)."""
    if not word.strip() or "," in word:
        raise ValueError("a trigger word must be non-empty and contain no commas, e.g. 'xyz_style'")
    return word.strip()
