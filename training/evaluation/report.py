"""evaluation.json: what evaluate-lora measured, per strength, with a verdict per number. Written by the
evaluation child into the evaluated training run's folder (a checkpoint's as evaluation-step<N>.json) and
read by the server's resource and the diagnostics rules. No torch here: the server imports this module.

Every score is a cosine similarity in [-1, 1] of model embeddings (CLIP ViT-L/14 text-image scores of a
matching prompt are about 0.25-0.35; DINOv2 image likeness of the same subject about 0.6-0.9)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

REPORT_NAME = "evaluation.json"


def report_name(step: int | None = None) -> str:
    """evaluation.json for the final LoRA; evaluation-step<N>.json for the checkpoint at step N."""
    return REPORT_NAME if step is None else f"evaluation-step{step}.json"


def grid_name(step: int | None, run: str) -> str:
    """The labelled grid beside `report_name(step)`, named by the evaluation `run` that drew it: a new
    evaluation's grid never replaces the one an older report still names (the report names its grid)."""
    return f"evaluation-grid-{run}.jpg" if step is None else f"evaluation-grid-step{step}-{run}.jpg"


class StrengthScores(BaseModel):
    """The scores at one strength (0: the base model). None: not measurable here (no trigger word to take
    out, no training images, no control prompt)."""

    strength: float
    prompt_score: float = Field(
        description="Mean CLIP text-image cosine over prompts x seeds, rendered with the trigger word."
    )
    prompt_score_without_trigger: float | None = Field(
        None, description="The same, rendered with the trigger word taken out."
    )
    likeness_dino_mean: float | None = Field(
        None,
        description="DINOv2 image cosine to the training images: mean over generated images of their best match.",
    )
    likeness_dino_max: float | None = Field(None, description="The highest single generated-training pair (DINOv2).")
    likeness_clip_mean: float | None = Field(None, description="As likeness_dino_mean with CLIP image embeddings.")
    likeness_clip_max: float | None = Field(None, description="As likeness_dino_max with CLIP image embeddings.")
    likeness_without_trigger_dino_mean: float | None = Field(
        None, description="likeness_dino_mean of the images rendered without the trigger word."
    )
    control_shift: float | None = Field(
        None,
        description="1 - mean DINOv2 cosine between the control prompt's image here and at strength 0, same seed "
        "(0 at strength 0; style bleeding shows as a large shift).",
    )
    diversity: float = Field(
        description="Mean pairwise DINOv2 cosine among the seeds' images of the same prompt (near 1: collapse)."
    )
    nearest_training_image: str | None = Field(
        None, description="The training image (relative path) of the likeness_dino_max pair."
    )


class EvaluationReport(BaseModel):
    """evaluation.json."""

    job_id: str | None = None
    step: int | None = None
    lora: str
    model_name: str
    clip_model: str
    dino_model: str
    prompts: list[str]
    control_prompt: str | None = None
    trigger_word: str | None = None
    seeds: list[int]
    strengths: list[float]
    rows: list[StrengthScores] = Field(description="One per strength, in the order of `strengths`; 0 first.")
    best_strength: float | None = Field(None, description="None: no strength does better than the base.")
    verdicts: list[str] = Field(default_factory=list, description="Plain sentences with the numbers.")
    grid: str = Field(description="File name of the labelled grid image beside the report.")

    def row(self, strength: float) -> StrengthScores | None:
        """The scores at `strength`, if it was evaluated."""
        return next((row for row in self.rows if row.strength == strength), None)

    @property
    def base(self) -> StrengthScores:
        """The scores of the base model (strength 0, always evaluated)."""
        return self.rows[0]


def read_report(run_dir: Path, step: int | None = None) -> EvaluationReport | None:
    """The run's evaluation (of its final LoRA, or of the checkpoint at `step`), None when it has none or
    the file is not a report (one from an older version: evaluate again)."""
    path = Path(run_dir) / report_name(step)
    try:
        return EvaluationReport.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
