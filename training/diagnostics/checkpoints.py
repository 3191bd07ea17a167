"""Which saved LoRA of a run to use: where evaluate-lora measured two or more of them, the best measured
(evaluation_scores.py); else the checkpoint with the lowest validation loss (the point before it starts
to overfit), else the last one whose samples had moved from the baseline without copying the training
images, else the latest."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from training.diagnostics.evaluation_scores import Judgement, best_of, comparable, judge

if TYPE_CHECKING:
    from training.diagnostics.evidence import RunEvidence


# Sample distances are the mean absolute difference at 64 px, 0-1 (training/run_evidence.py); the rules
# (training_rules.py) and the recommendation judge them by the same lines:
COPY_DISTANCE = 0.05  # trigger samples within 0.05 of a training image copy it (unrelated photos are ~0.3 apart)
NO_EFFECT_DISTANCE = 0.01  # trigger samples within 0.01 of their step-0 image show no effect (an unchanged LoRA: 0)


class CheckpointChoice(BaseModel):
    step: int = Field(description="The step of the recommended LoRA (a checkpoint, or the final LoRA).")
    reason: str


def recommend_checkpoint(evidence: RunEvidence, steps: list[int]) -> CheckpointChoice | None:
    """The best of `steps` (the run's saved LoRAs: checkpoint steps, and the last step when the
    final LoRA exists), with the reason; None when there is nothing saved."""
    if not steps:
        return None
    measured = _by_evaluation(evidence, steps)
    if measured is not None:
        return measured
    scored = [row for row in evidence.validation if row.step > 0]
    if scored:
        best = min(scored, key=lambda row: row.loss)
        step = _nearest(steps, best.step)
        latest = scored[-1]
        trend = (
            f"; it has since risen to {latest.loss:.4f} at step {latest.step}"
            if latest.step > best.step and latest.loss > best.loss
            else ""
        )
        return CheckpointChoice(
            step=step,
            reason=f"lowest validation loss, {best.loss:.4f} at step {best.step}{trend}"
            + (f" (the nearest saved LoRA is step {step})" if step != best.step else ""),
        )
    good = [
        row.step
        for row in evidence.samples
        if not row.control
        and row.step > 0
        and (row.baseline_distance or 0) > NO_EFFECT_DISTANCE
        and (row.nearest_training_distance is None or row.nearest_training_distance > COPY_DISTANCE)
    ]
    if good:
        step = _nearest(steps, max(good))
        return CheckpointChoice(
            step=step,
            reason=f"no validation loss recorded; the samples at step {max(good)} are the last to differ from the "
            "untrained baseline without copying a training image",
        )
    return CheckpointChoice(step=max(steps), reason="no validation loss or sample statistics to judge by: the latest")


def _nearest(steps: list[int], target: int) -> int:
    """The saved step closest to `target`; on a tie the earlier one (less trained is the safer side)."""
    return min(steps, key=lambda step: (abs(step - target), step))


def _by_evaluation(evidence: RunEvidence, steps: list[int]) -> CheckpointChoice | None:
    """The best of the saved LoRAs evaluate-lora measured, when it measured two or more with the same prompts,
    seeds and scorer models as the latest evaluation (other numbers do not compare) and one of them has no
    problem (no effect, copying, prompts lost); None otherwise."""
    final = evidence.train[-1].step if evidence.train else evidence.config.steps
    latest = evidence.evaluations[-1] if evidence.evaluations else None
    judged: dict[int, Judgement] = {}
    for report in evidence.evaluations:
        if not comparable([report, latest]):
            continue
        step = final if report.step is None else report.step
        if step in steps and (judgement := judge(report)) is not None:
            judged[step] = judgement
    judged = dict(sorted(judged.items()))  # earliest first: on a tie the less trained wins
    best = best_of(judged) if len(judged) >= 2 else None
    if best is None:
        return None
    excluded = "".join(f"; step {step} {' and '.join(j.problems)}" for step, j in judged.items() if j.problems)
    return CheckpointChoice(
        step=best,
        reason=f"the best evaluate-lora measured among steps {', '.join(map(str, judged))}: "
        f"{judged[best].line()}{excluded}",
    )
