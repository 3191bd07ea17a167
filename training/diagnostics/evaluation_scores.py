"""How an evaluation (evaluation.json, written by evaluate-lora) is judged: the lines the evaluation rules
(evaluation_rules.py), the recommended checkpoint (checkpoints.py) and compare-training-runs share.

Every score is a cosine of model embeddings (training/evaluation/report.py). The lines below come from
published numbers for the full-size models (CLIP ViT-L/14, DINOv2); the tiny random models of the tests
cannot calibrate them, so the tests build reports with chosen numbers.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, Field

from training.evaluation.report import EvaluationReport, StrengthScores

# DreamBench (DreamBooth paper) DINO likeness: real photos of the subject 0.77 to each other, DreamBooth 0.67,
# Textual Inversion 0.57; a LoRA that learned its subject gains 0.1-0.2 over the base model. A gain under
# 0.02, a tenth of that, is what changing seeds alone moves it by: no effect.
NO_EFFECT_LIKENESS_GAIN = 0.02
# Different photos of one subject score ~0.77 DINO; 0.95 between a generated and a training image is the
# same picture again (a near-duplicate), not the same subject.
COPY_LIKENESS = 0.95
# The seeds' images of one prompt: a base model varies pose and layout (pairwise DINO ~0.4-0.6); at 0.9 they
# are one image. Copying is a near-duplicate AND this collapse: one close pair alone can be a lucky seed.
COLLAPSE_DIVERSITY = 0.9
# CLIP ViT-L/14 text-image cosine: ~0.30 for a matching prompt, ~0.15-0.20 for an unrelated one. Losing 15%
# of the base's score (0.30 -> 0.255) is a third of the way to ignoring the prompt.
PROMPT_SCORE_LOSS = 0.15
# control_shift is 1 - DINO cosine of the control prompt's image to the base's (same seed). A LoRA that leaves
# other prompts alone still nudges details (cosine > 0.85); below 0.8 the picture's look has changed.
BLEED_CONTROL_SHIFT = 0.2
# The likeness gained with the trigger word taken out, as a share of the gain with it: at 3/4 or more the
# trigger word hardly matters, the LoRA's look comes with every prompt.
BLEED_TRIGGERLESS_SHARE = 0.75

K = TypeVar("K")


def full_row(report: EvaluationReport) -> StrengthScores | None:
    """The highest strength evaluated (normally 1.0); None when only the base was."""
    rows = [row for row in report.rows if row.strength > 0]
    return max(rows, key=lambda row: row.strength) if rows else None


def likeness_gain(report: EvaluationReport, row: StrengthScores) -> float | None:
    """DINOv2 likeness to the training images at `row` minus the base model's; None without training images."""
    base = report.row(0.0)
    if base is None or row.likeness_dino_mean is None or base.likeness_dino_mean is None:
        return None
    return row.likeness_dino_mean - base.likeness_dino_mean


def prompt_loss(report: EvaluationReport, row: StrengthScores) -> float | None:
    """How much of the base model's CLIP prompt score `row` lost (0.2: 20% lower; negative: higher)."""
    base = report.row(0.0)
    if base is None or base.prompt_score <= 0:
        return None
    return (base.prompt_score - row.prompt_score) / base.prompt_score


def copies(row: StrengthScores) -> bool:
    """A generated image is a near-duplicate of a training image and the seeds' images have collapsed."""
    return (row.likeness_dino_max or 0) >= COPY_LIKENESS and row.diversity >= COLLAPSE_DIVERSITY


def judged_row(report: EvaluationReport) -> StrengthScores | None:
    """The strength a LoRA is judged and ranked at: the report's best strength, else the highest."""
    best = report.row(report.best_strength) if report.best_strength is not None else None
    return best or full_row(report)


class Judgement(BaseModel):
    """One evaluation in a line: what ranks checkpoints and runs."""

    strength: float
    likeness: float | None = Field(description="DINOv2 likeness at that strength.")
    base_likeness: float | None
    gain: float | None = Field(description="likeness - base_likeness.")
    prompt_score: float
    problems: list[str] = Field(description="What disqualifies it: 'no effect', 'copies', 'loses the prompt'.")

    def line(self) -> str:
        likeness = (
            f"likeness {self.likeness:.2f} vs base {self.base_likeness:.2f}"
            if self.gain is not None
            else "likeness not measured"
        )
        return f"{likeness}, prompt score {self.prompt_score:.3f} at strength {self.strength:g}"


def judge(report: EvaluationReport) -> Judgement | None:
    """The judgement of one evaluation; None when it evaluated the base alone.

    The prompt is judged at the judged row (the best strength): a LoRA best used at 0.75 whose prompt score
    drops at 1.0 is the guide's normal case, not a failure (evaluation_prompt_lost reports that drop)."""
    row, full = judged_row(report), full_row(report)
    if row is None or full is None:
        return None
    problems = []
    gain, full_gain, lost = likeness_gain(report, row), likeness_gain(report, full), prompt_loss(report, row)
    if full_gain is not None and full_gain < NO_EFFECT_LIKENESS_GAIN:
        problems.append("no effect")
    if any(copies(r) for r in report.rows if r.strength > 0):
        problems.append("copies")
    if lost is not None and lost >= PROMPT_SCORE_LOSS:
        problems.append("loses the prompt")
    base = report.row(0.0)
    return Judgement(
        strength=row.strength,
        likeness=row.likeness_dino_mean,
        base_likeness=base.likeness_dino_mean if base else None,
        gain=gain,
        prompt_score=row.prompt_score,
        problems=problems,
    )


def comparable(reports: list[EvaluationReport]) -> bool:
    """Evaluations compare only when they scored the same prompts and seeds with the same models."""
    return len({(tuple(r.prompts), tuple(r.seeds), r.clip_model, r.dino_model) for r in reports}) == 1


def best_of(judgements: dict[K, Judgement]) -> K | None:
    """The key of the best judgement without problems: the highest likeness gain (the prompt score breaks a
    tie, then the order of `judgements`: give checkpoints earliest first); None when every one has a problem
    or none measured likeness."""
    passing = {key: j for key, j in judgements.items() if not j.problems and j.gain is not None}
    return max(passing, key=lambda key: (passing[key].gain, passing[key].prompt_score), default=None)
