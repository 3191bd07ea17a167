"""Rules over what evaluate-lora measured: the run's evaluation.json (and its checkpoints'
evaluation-step<N>.json), read into RunEvidence.evaluations.

The sample rules (training_rules.py) judge the LoRA by pixel distances of 64 px samples; an evaluation
measures it with CLIP and DINOv2 embeddings at several strengths against the base model. Where one exists
for the run's latest LoRA, its rules answer the same questions (no effect, copying, style bleeding) in
place of the sample rules, and add one they cannot: whether the LoRA still follows the prompt. Thresholds
are evaluation_scores.py's; the fixes are the sample rules' patches.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from training.diagnostics.evaluation_scores import (
    BLEED_CONTROL_SHIFT,
    BLEED_TRIGGERLESS_SHARE,
    NO_EFFECT_LIKENESS_GAIN,
    PROMPT_SCORE_LOSS,
    copies,
    full_row,
    judge,
    likeness_gain,
    prompt_loss,
)
from training.diagnostics.evidence import RunEvidence
from training.diagnostics.findings import Finding
from training.diagnostics.patches import (
    DROPOUT_AGAINST_COPYING,
    DROPOUT_AGAINST_OVERFITTING,
    bleeding_patch,
    no_effect_patch,
)
from training.evaluation.report import EvaluationReport, StrengthScores


def latest_evaluation(evidence: RunEvidence) -> EvaluationReport | None:
    """The evaluation of the run's most trained LoRA (the final LoRA's where there is one); None without one
    or when it measured the base model alone."""
    report = evidence.evaluations[-1] if evidence.evaluations else None
    return report if report is not None and judge(report) is not None else None


def _which(report: EvaluationReport) -> str:
    return "the final LoRA" if report.step is None else f"the checkpoint at step {report.step}"


def _earlier_step(evidence: RunEvidence, report: EvaluationReport, problem: str) -> int | None:
    """The latest evaluated checkpoint before `report` without `problem`: where the run should have stopped."""
    limit = math.inf if report.step is None else report.step
    fine = [
        other.step
        for other in evidence.evaluations
        if other.step is not None and other.step < limit and (judged := judge(other)) and problem not in judged.problems
    ]
    return max(fine, default=None)


def _stop_earlier_patch(evidence: RunEvidence, earlier: int | None, dropout: float) -> dict:
    """Against overfitting measured: stop at the `earlier` checkpoint that was fine, with `dropout` where the
    config has less."""
    patch: dict = {"steps": earlier} if earlier is not None else {}
    if evidence.config.dropout < dropout:
        patch["dropout"] = dropout
    return patch


def _safe_strength(report: EvaluationReport, bad: Callable[[StrengthScores], bool]) -> float | None:
    """The highest strength below the first one where `bad` holds: the strength to use the LoRA at."""
    rows = sorted((row for row in report.rows if row.strength > 0), key=lambda row: row.strength)
    first_bad = next((row.strength for row in rows if bad(row)), math.inf)
    return max((row.strength for row in rows if row.strength < first_bad), default=None)


def evaluation_no_effect(evidence: RunEvidence) -> Finding | None:
    """At full strength the images look no more like the training images than the base model's do."""
    report = latest_evaluation(evidence)
    full = full_row(report) if report else None
    gain = likeness_gain(report, full) if full else None
    if gain is None or gain >= NO_EFFECT_LIKENESS_GAIN:
        return None
    base = report.row(0.0)
    return Finding(
        rule="evaluation-no-effect",
        severity="warning",
        message=f"evaluate-lora measured {_which(report)}: at strength {full.strength:g} its images' DINOv2 likeness "
        f"to the training images is {full.likeness_dino_mean:.2f}, the base model's {base.likeness_dino_mean:.2f} "
        f"({gain:+.2f}): the LoRA has no measurable effect; raise the learning rate, train longer or raise rank, "
        "and check the trigger word is in the captions and the test prompts.",
        evidence={
            "step": report.step,
            "strength": full.strength,
            "likeness": full.likeness_dino_mean,
            "base_likeness": base.likeness_dino_mean,
            "gain": gain,
            "clip_likeness": full.likeness_clip_mean,
            "base_clip_likeness": base.likeness_clip_mean,
        },
        patch=no_effect_patch(evidence.config),
    )


def evaluation_copying(evidence: RunEvidence) -> Finding | None:
    """From some strength on, a generated image is a near-duplicate of a training image and the seeds'
    images have collapsed into one: the LoRA reproduces its data instead of the concept."""
    report = latest_evaluation(evidence)
    copying = [row for row in report.rows if row.strength > 0 and copies(row)] if report else []
    if not copying:
        return None
    row, base = min(copying, key=lambda r: r.strength), report.row(0.0)
    safe, earlier = _safe_strength(report, copies), _earlier_step(evidence, report, "copies")
    advice = f"; at strength {safe:g} it does not copy" if safe is not None else ""
    advice += f"; the checkpoint at step {earlier} did not copy" if earlier is not None else ""
    return Finding(
        rule="evaluation-copying",
        severity="warning",
        message=f"evaluate-lora measured {_which(report)}: from strength {row.strength:g} a generated image is a "
        f"near-duplicate of the training image {row.nearest_training_image or '?'} (DINOv2 "
        f"{row.likeness_dino_max:.2f}) and the seeds' images are alike (diversity {row.diversity:.2f}, base "
        f"{base.diversity:.2f}): the LoRA copies its training images; train fewer steps with dropout, use more "
        f"diverse captions or prior preservation{advice}.",
        evidence={
            "step": report.step,
            "strength": row.strength,
            "likeness_max": row.likeness_dino_max,
            "nearest_training_image": row.nearest_training_image,
            "diversity": row.diversity,
            "base_diversity": base.diversity,
            "safe_strength": safe,
            "earlier_step": earlier,
        },
        patch=_stop_earlier_patch(evidence, earlier, DROPOUT_AGAINST_COPYING),
    )


def evaluation_prompt_lost(evidence: RunEvidence) -> Finding | None:
    """At full strength the images match their prompts clearly worse than the base model's (CLIP score): the
    LoRA overrides what the prompt asks for, the guide's overfitting. A warning when the best strength loses
    the prompt too; information when the LoRA keeps it at its best strength (used at 0.75, as the guide
    advises, it works)."""
    report = latest_evaluation(evidence)
    full = full_row(report) if report else None
    lost = prompt_loss(report, full) if full else None
    if lost is None or lost < PROMPT_SCORE_LOSS:
        return None
    base = report.row(0.0)
    usable = "loses the prompt" not in judge(report).problems
    safe = _safe_strength(report, lambda row: (prompt_loss(report, row) or 0) >= PROMPT_SCORE_LOSS)
    earlier = _earlier_step(evidence, report, "loses the prompt")
    advice = f"use it at strength {safe:g}, where the score holds, or " if safe is not None else ""
    advice += f"stop at step {earlier} (evaluated without the loss), or " if earlier is not None else ""
    return Finding(
        rule="evaluation-prompt-lost",
        severity="info" if usable else "warning",
        message=f"evaluate-lora measured {_which(report)}: at strength {full.strength:g} the CLIP prompt score is "
        f"{full.prompt_score:.3f}, {lost:.0%} below the base model's {base.prompt_score:.3f}: the LoRA overrides the "
        f"prompts (overfitting); {advice}train fewer steps with dropout and more varied captions.",
        evidence={
            "step": report.step,
            "strength": full.strength,
            "prompt_score": full.prompt_score,
            "base_prompt_score": base.prompt_score,
            "loss": lost,
            "safe_strength": safe,
            "earlier_step": earlier,
        },
        patch=_stop_earlier_patch(evidence, earlier, DROPOUT_AGAINST_OVERFITTING),
    )


def evaluation_style_bleeding(evidence: RunEvidence) -> Finding | None:
    """The LoRA changes what it should not: the control prompt's image moved from the base model's, or the
    training images' look comes as strongly without the trigger word as with it."""
    report = latest_evaluation(evidence)
    full = full_row(report) if report else None
    if full is None:
        return None
    base, gain = report.row(0.0), likeness_gain(report, full)
    share = None
    without = full.likeness_without_trigger_dino_mean
    if report.trigger_word and without is not None and (gain or 0) >= NO_EFFECT_LIKENESS_GAIN:
        share = (without - base.likeness_dino_mean) / gain
    seen = []
    shift = full.control_shift
    if shift is not None and shift > BLEED_CONTROL_SHIFT:
        seen.append(f"the control prompt's image moved {shift:.2f} from the base model's (1 - DINOv2 cosine)")
    if share is not None and share >= BLEED_TRIGGERLESS_SHARE:
        seen.append(
            f"without the trigger word {report.trigger_word!r} its images gain {share:.0%} of the likeness they "
            "gain with it"
        )
    if not seen:
        return None
    safe = _safe_strength(report, lambda row: (row.control_shift or 0) > BLEED_CONTROL_SHIFT)
    lower = f" ({safe:g} keeps the control prompt)" if safe is not None and safe < full.strength else ""
    return Finding(
        rule="evaluation-style-bleeding",
        severity="warning",
        message=f"evaluate-lora measured {_which(report)} at strength {full.strength:g}: {'; '.join(seen)}: the LoRA "
        "bleeds into prompts without its trigger word; make captions more specific, use regularisation images, "
        f"narrow the focus, or use it at a lower strength{lower}.",
        evidence={
            "step": report.step,
            "strength": full.strength,
            "control_shift": full.control_shift,
            "likeness_gain": gain,
            "likeness_gain_share_without_trigger": share,
            "safe_strength": safe,
        },
        patch=bleeding_patch(evidence.config),
    )


def evaluation_summary(evidence: RunEvidence) -> Finding | None:
    """What the evaluation found, in its own verdicts: the answer to "is it good, and at what strength"."""
    report = latest_evaluation(evidence)
    if report is None:
        return None
    judgement = judge(report)
    best = (
        f"best strength {report.best_strength:g}"
        if report.best_strength is not None
        else "no strength does better than the base model"
    )
    verdicts = "".join(f" {verdict.rstrip('.')}." for verdict in report.verdicts)
    return Finding(
        rule="evaluation",
        severity="info",
        message=f"evaluate-lora measured {_which(report)}: {best}, {judgement.line()}.{verdicts}",
        evidence={"step": report.step, "best_strength": report.best_strength, **judgement.model_dump()},
    )


EVALUATION_RULES: list[Callable[[RunEvidence], Finding | None]] = [
    evaluation_no_effect,
    evaluation_copying,
    evaluation_prompt_lost,
    evaluation_style_bleeding,
    evaluation_summary,
]
# The sample rules whose questions an evaluation of the run's latest LoRA answers with model embeddings.
REPLACED_BY_EVALUATION = {"no-effect", "samples-copy-training-images", "style-bleeding"}


def with_evaluation(evidence: RunEvidence, findings: list[Finding]) -> list[Finding]:
    """`findings` (the training rules') with the evaluation's added. An evaluation at or past the latest
    samples replaces the sample rules that ask the same questions: pixel distances at 64 px are the weaker
    evidence; an older one (a checkpoint's, while training went on) does not."""
    report = latest_evaluation(evidence)
    if report is None:
        return findings
    sampled = max((row.step for row in evidence.samples), default=0)
    current = report.step is None or report.step >= sampled
    kept = [f for f in findings if not (current and f.rule in REPLACED_BY_EVALUATION)]
    return kept + [finding for rule in EVALUATION_RULES if (finding := rule(evidence)) is not None]
