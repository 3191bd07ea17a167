"""evaluate-lora's arguments (`EvaluationRequest`, the one declaration of them and their defaults) and the
child's request.json (`EvaluationJob`: the same with what the server resolved before anything renders).
No torch here: the server imports this module."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, field_validator, model_validator

from training.config import TrainingConfig
from training.generation import DEFAULT_STEPS, Seed, check_strengths

DEFAULT_SEEDS = [1, 2, 3]  # three seeds: enough for a mean and a pairwise diversity, 3x the renders of one
# The base (0) and the guide's strength table: 0.5 (a light touch), 0.75 (the usual best), 1 (full).
DEFAULT_STRENGTHS = [0.0, 0.5, 0.75, 1.0]
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"  # ViT-L/14: the CLIP score models in the literature use
DEFAULT_DINO_MODEL = "facebook/dinov2-small"  # DreamBench's DINO likeness, in its smallest (22M) variant
MAX_PROMPTS = 8  # each prompt costs seeds x strengths x 2 renders (with and without the trigger)


def _as_in_training(field: str):
    """TrainingConfig's type of `field` with its bounds: the one declaration of them."""
    info = TrainingConfig.model_fields[field]
    return Annotated[(info.annotation, *info.metadata)]


SampleSteps = _as_in_training("sample_steps")
SampleGuidance = _as_in_training("sample_guidance_scale")
Resolution = _as_in_training("resolution")


# No docstring: clients would read it as the tool's schema description.
class EvaluationRequest(BaseModel):

    job_id: str | None = Field(
        None, description="A training job whose LoRA to evaluate (its final LoRA, or the checkpoint at `step`)."
    )
    step: int | None = Field(None, ge=1, description="With job_id: evaluate the checkpoint saved at this step.")
    lora: str | None = Field(
        None, description="Instead of job_id: an exported LoRA's name (list-exported-models) or a .safetensors path."
    )
    model_name: str | None = Field(
        None, description="With lora: its base model; default: the base model the LoRA's metadata names."
    )
    prompts: list[str] | None = Field(
        None,
        min_length=1,
        max_length=MAX_PROMPTS,
        description="Prompts to render, with the trigger word; default: the training job's test prompts.",
    )
    seeds: list[Seed] = Field(
        DEFAULT_SEEDS, min_length=2, max_length=8, description="Fixed seeds, one image per prompt and strength each."
    )
    strengths: list[float] = Field(
        DEFAULT_STRENGTHS,
        min_length=1,
        max_length=8,
        description="LoRA strengths (model and CLIP); 0, the base model, is always added.",
    )
    clip_model: str = Field(
        DEFAULT_CLIP_MODEL, description="CLIP model (local folder or Hugging Face id) for prompt and image scores."
    )
    dino_model: str = Field(DEFAULT_DINO_MODEL, description="DINOv2 model for the likeness to the training images.")

    @model_validator(mode="after")
    def _one_subject(self) -> EvaluationRequest:
        if (self.job_id is None) == (self.lora is None):
            raise ValueError("give either job_id (a training job) or lora (a LoRA file), not both or neither")
        if self.step is not None and self.job_id is None:
            raise ValueError("step names a checkpoint of a training job: give job_id with it")
        return self

    @field_validator("prompts")
    @classmethod
    def _prompts_not_blank(cls, prompts: list[str] | None) -> list[str] | None:
        if prompts is not None and any(not prompt.strip() for prompt in prompts):
            raise ValueError("prompts must not be empty")
        return prompts

    @field_validator("strengths")
    @classmethod
    def _with_base(cls, strengths: list[float]) -> list[float]:
        check_strengths(strengths)
        return sorted({0.0, *strengths})  # every comparison is against the base, strength 0


class EvaluationJob(EvaluationRequest):
    """The evaluation child's request.json: the tool's arguments with the LoRA's path, its base model, the
    prompts, the training images and where the report goes filled in by the server."""

    lora: str = Field(description="The LoRA file's path.")
    model_name: str
    prompts: list[str] = Field(min_length=1, max_length=MAX_PROMPTS)
    trigger_word: str | None = None
    control_prompt: str | None = None
    training_images: str | None = Field(
        None, description="The training dataset's folder (its 'validation' subfolder is left out); None: no likeness."
    )
    output_dir: str = Field(description="Where evaluation.json and its grid go: the evaluated training run's folder.")
    # As the training run rendered its samples (its sample_steps, sample_guidance_scale and resolution, with
    # their bounds), so that an evaluation and the run's samples agree.
    steps: SampleSteps = DEFAULT_STEPS
    guidance: SampleGuidance = None
    resolution: Resolution = Field(None, description="Pixels a side; None: native.")

    @model_validator(mode="after")
    def _one_subject(self) -> EvaluationJob:
        """Turns off the parent's either/or check of job_id and lora: here both are resolved (the LoRA is a
        path whether or not a training job named it, and job_id names that job, if any)."""
        return self
