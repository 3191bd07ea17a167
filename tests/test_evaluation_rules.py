"""The rules over evaluate-lora's measurements: each fires on reports built with its symptom's numbers and
stays quiet on a good LoRA's (the tiny random CLIP and DINOv2 models cannot produce calibrated numbers);
the recommended checkpoint and compare-training-runs rank by them; diagnose-training reads them from a
trained run's folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_troubleshooting import trained_job

from server.configs import ConfigService
from server.diagnostics import apply_fix, compare_runs, diagnose
from server.jobs import JobService
from training.config import TrainingConfig
from training.diagnostics.checkpoints import recommend_checkpoint
from training.diagnostics.evaluation_scores import best_of, judge
from training.diagnostics.evaluation_rules import (
    EVALUATION_RULES,
    evaluation_copying,
    evaluation_no_effect,
    evaluation_prompt_lost,
    evaluation_style_bleeding,
    evaluation_summary,
    with_evaluation,
)
from training.diagnostics.evidence import RunEvidence, SampleRow, ValidationRow, read_evaluations
from training.diagnostics.findings import Finding
from training.diagnostics.rules import training_findings
from training.evaluation.report import EvaluationReport, StrengthScores, report_name

VERDICT = "best strength about 0.75: likeness 0.65 vs base 0.42"


def config(**values) -> TrainingConfig:
    return TrainingConfig.from_dict({"name": "c", "dataset_path": "d", "steps": 1000, **values})


def scores(strength: float, prompt: float, likeness: float, **values) -> StrengthScores:
    fields = dict(
        strength=strength,
        prompt_score=prompt,
        prompt_score_without_trigger=prompt,
        likeness_dino_mean=likeness,
        likeness_dino_max=likeness + 0.15,
        likeness_clip_mean=likeness + 0.2,
        likeness_clip_max=likeness + 0.3,
        likeness_without_trigger_dino_mean=0.42 + (likeness - 0.42) / 4,  # the trigger word does most of it
        control_shift=strength / 10,
        diversity=0.5 + strength / 10,
        nearest_training_image="shapes/2.png",
    )
    return StrengthScores(**{**fields, **values})


GOOD = [scores(0.0, 0.30, 0.42), scores(0.5, 0.295, 0.55), scores(0.75, 0.29, 0.65), scores(1.0, 0.28, 0.71)]


def report(step: int | None = None, *, best: float | None = 0.75, trigger="xyz_shape", **full) -> EvaluationReport:
    """A good LoRA's evaluation; `full` changes its strength-1 row, a list under `rows` replaces them all."""
    rows = full.pop("rows", None) or [*GOOD[:3], GOOD[3].model_copy(update=full)]
    return EvaluationReport(
        job_id="job",
        step=step,
        lora="lora.safetensors",
        model_name="builtin:tiny-sd15",
        clip_model="builtin:tiny-clip",
        dino_model="builtin:tiny-dinov2",
        prompts=["xyz_shape a red circle"],
        control_prompt="a red circle",
        trigger_word=trigger,
        seeds=[1, 2, 3],
        strengths=[row.strength for row in rows],
        rows=rows,
        best_strength=best,
        verdicts=[VERDICT],
        grid="evaluation-grid.jpg",
    )


COPYING = [*GOOD[:2], *(row.model_copy(update={"likeness_dino_max": 0.97, "diversity": 0.95}) for row in GOOD[2:])]


def evidence(*reports: EvaluationReport, **values) -> RunEvidence:
    return RunEvidence(config=values.pop("config", config()), evaluations=list(reports), **values)


def fire(rule, run: RunEvidence) -> Finding:
    finding = rule(run)
    assert finding is not None, f"{rule.__name__} did not fire"
    TrainingConfig.from_dict({**run.config.model_dump(exclude_none=True), **finding.patch})  # a valid fix
    assert finding.message.endswith(".") and finding.line().startswith(f"[{finding.rule}]")
    return finding


def test_a_good_lora_gets_only_its_verdict():
    run = evidence(report())
    assert [rule(run) for rule in EVALUATION_RULES if rule is not evaluation_summary] == [None] * 4
    summary = fire(evaluation_summary, run)
    assert summary.severity == "info" and summary.patch == {}
    assert "final LoRA: best strength 0.75, likeness 0.65 vs base 0.42, prompt score 0.290" in summary.message
    assert summary.message.endswith(f"{VERDICT}.") and summary.evidence["gain"] == pytest.approx(0.23)
    assert summary.evidence["problems"] == []
    assert "no strength does better" in fire(evaluation_summary, evidence(report(best=None))).message


@pytest.mark.parametrize("rule", EVALUATION_RULES)
def test_every_rule_is_quiet_without_an_evaluation(rule):
    assert rule(evidence()) is None
    assert rule(evidence(report(rows=GOOD[:1]))) is None  # the base model alone: nothing to compare


def test_no_effect_when_full_strength_looks_like_the_base():
    finding = fire(evaluation_no_effect, evidence(report(likeness_dino_mean=0.43)))
    assert finding.rule == "evaluation-no-effect" and finding.severity == "warning"
    assert finding.patch == {"learning_rate": 3e-4, "steps": 1500}  # the sample rule's fix: 2x lr, 1.5x steps
    assert finding.evidence["gain"] == pytest.approx(0.01) and "0.43, the base model's 0.42 (+0.01)" in finding.message
    assert evaluation_no_effect(evidence(report(likeness_dino_mean=0.45))) is None  # +0.03 is an effect


def test_copying_needs_a_near_duplicate_and_collapsed_seeds():
    finding = fire(evaluation_copying, evidence(report(rows=COPYING)))
    assert finding.rule == "evaluation-copying" and finding.patch == {"dropout": 0.2}
    assert finding.evidence["strength"] == 0.75 and finding.evidence["safe_strength"] == 0.5
    assert "shapes/2.png (DINOv2 0.97)" in finding.message and "at strength 0.5 it does not copy" in finding.message
    # Checkpoints evaluated before: the latest that did not copy is where to stop.
    history = [report(200), report(400, rows=COPYING), report(rows=COPYING)]
    assert fire(evaluation_copying, evidence(*history)).patch == {"dropout": 0.2, "steps": 200}
    assert evaluation_copying(evidence(report(likeness_dino_max=0.97))) is None  # a close pair, seeds still vary
    assert evaluation_copying(evidence(report(diversity=0.95))) is None  # alike, but no training image copied


def test_prompt_following_lost_at_full_strength():
    finding = fire(evaluation_prompt_lost, evidence(report(prompt_score=0.24)))
    assert finding.rule == "evaluation-prompt-lost" and finding.patch == {"dropout": 0.1}
    assert finding.severity == "info"  # the best strength, 0.75, keeps the prompt (see the next test)
    assert finding.evidence["loss"] == pytest.approx(0.2) and finding.evidence["safe_strength"] == 0.75
    assert "0.240, 20% below the base model's 0.300" in finding.message and "strength 0.75" in finding.message
    history = evidence(report(300), report(prompt_score=0.24), config=config(dropout=0.2))
    assert fire(evaluation_prompt_lost, history).patch == {"steps": 300}
    assert evaluation_prompt_lost(evidence(report(prompt_score=0.27))) is None  # 10% lower: within the line


def test_a_prompt_drop_past_the_best_strength_is_information_not_a_disqualification():
    """The issue's own example: best at 0.75, the prompt score dropping past 0.9. At its best strength the LoRA
    keeps the prompt: it is ranked, and the drop at 1.0 is told with the strength to use; only a LoRA that loses
    the prompt at every strength it does better than the base at is disqualified."""
    dropping = report(prompt_score=0.24)  # best 0.75 (0.29: 3% under the base); strength 1: 20% under
    assert judge(dropping).problems == [] and judge(dropping).strength == 0.75
    told = fire(evaluation_prompt_lost, evidence(dropping))
    assert told.severity == "info" and told.evidence["safe_strength"] == 0.75
    lost = report(best=None, prompt_score=0.24)  # no strength does better without losing the prompt
    assert judge(lost).problems == ["loses the prompt"]
    assert fire(evaluation_prompt_lost, evidence(lost)).severity == "warning"
    assert best_of({"dropping": judge(dropping), "lost": judge(lost)}) == "dropping"
    # The recommended checkpoint ranks it too: its likeness gain at 0.75 (0.28) beats the step-200 LoRA's (0.23).
    stronger = [
        *GOOD[:2],
        GOOD[2].model_copy(update={"likeness_dino_mean": 0.7}),
        GOOD[3].model_copy(update={"prompt_score": 0.24}),
    ]
    choice = recommend_checkpoint(evidence(report(200), report(400, rows=stronger)), [200, 400])
    assert choice.step == 400 and "likeness 0.70 vs base 0.42" in choice.reason


def test_style_bleeding_from_the_control_prompt_or_an_idle_trigger_word():
    moved = fire(evaluation_style_bleeding, evidence(report(control_shift=0.3)))
    assert moved.rule == "evaluation-style-bleeding" and moved.patch == {}
    assert moved.evidence["safe_strength"] == 0.75 and "(0.75 keeps the control prompt)" in moved.message
    person = config(class_prompt="a photo of a person")
    assert fire(evaluation_style_bleeding, evidence(report(control_shift=0.3), config=person)).patch == {
        "prior_preservation": True
    }
    idle = fire(evaluation_style_bleeding, evidence(report(likeness_without_trigger_dino_mean=0.68)))
    assert idle.evidence["likeness_gain_share_without_trigger"] == pytest.approx(0.26 / 0.29)
    assert "without the trigger word 'xyz_shape'" in idle.message
    # Without a trigger word there is nothing to take out.
    assert evaluation_style_bleeding(evidence(report(likeness_without_trigger_dino_mean=0.68, trigger=None))) is None


def test_a_current_evaluation_replaces_the_sample_rules_asking_the_same():
    still = [
        SampleRow(step=300, prompt_index=0, prompt="xyz_shape a circle", file="f.png", baseline_distance=0.001),
        SampleRow(step=300, prompt_index=1, prompt="a circle", file="g.png", control=True, baseline_distance=0.0),
    ]
    run = evidence(report(), samples=still)
    assert "no-effect" in {f.rule for f in training_findings(run)}  # 64 px samples that hardly moved
    measured = {f.rule for f in with_evaluation(run, training_findings(run))}
    assert "evaluation" in measured and "no-effect" not in measured
    older = evidence(report(200), samples=still)  # a checkpoint's, while the samples went on to step 300
    assert {"no-effect", "evaluation"} <= {f.rule for f in with_evaluation(older, training_findings(older))}


def test_the_evaluations_are_read_from_the_run_folder(tmp_path):
    (tmp_path / "config.yaml").write_text(config().to_yaml())
    (tmp_path / report_name(40)).write_text(report().model_dump_json())  # the file's name gives the step
    (tmp_path / report_name(8)).write_text(report(8).model_dump_json())
    (tmp_path / report_name()).write_text(report(best=1.0).model_dump_json())
    (tmp_path / report_name(9)).write_text("{not json")  # half-written or from an older version: left out
    (tmp_path / "evaluation-stepx.json").write_text(report().model_dump_json())
    read = RunEvidence.from_run_dir(tmp_path).evaluations
    assert [(r.step, r.best_strength) for r in read] == [(8, 0.75), (40, 0.75), (None, 1.0)]
    assert read_evaluations(tmp_path / "missing") == []


def test_the_recommended_checkpoint_is_the_best_measured():
    better = [*GOOD[:2], GOOD[2].model_copy(update={"likeness_dino_mean": 0.7}), GOOD[3]]
    measured = [report(200), report(400, rows=better), report(600, rows=COPYING)]
    validation = [ValidationRow(step=s, loss=v, images=2) for s, v in [(0, 0.3), (200, 0.2), (400, 0.19), (600, 0.1)]]
    choice = recommend_checkpoint(evidence(*measured, validation=validation), [200, 400, 600])
    assert choice.step == 400 and "among steps 200, 400, 600" in choice.reason
    assert "likeness 0.70 vs base 0.42" in choice.reason and "step 600 copies" in choice.reason
    # One measured LoRA ranks nothing, and neither do LoRAs that all have a problem: validation decides.
    assert recommend_checkpoint(evidence(measured[1], validation=validation), [200, 400, 600]).step == 600
    copied = [report(200, rows=COPYING), report(400, rows=COPYING)]
    assert recommend_checkpoint(evidence(*copied, validation=validation), [200, 400, 600]).step == 600
    # Only evaluations made like the latest (prompts, seeds, scorer models) are ranked: other numbers do not compare.
    other_prompts = report(400, rows=better).model_copy(update={"prompts": ["xyz_shape a blue square"]})
    choice = recommend_checkpoint(evidence(report(200), other_prompts, report(600)), [200, 400, 600])
    assert choice.step == 200 and "among steps 200, 600:" in choice.reason  # equal gains: the less trained
    # The final LoRA's evaluation (step None) counts as the run's last step.
    final = evidence(report(200, rows=better), report(), config=config(steps=600))  # else the latest would win
    assert recommend_checkpoint(final, [200, 600]).step == 200


def test_diagnose_compare_and_apply_fix_use_a_runs_evaluations(tmp_path, tiny_sd15, shapes):
    """Two tiny runs, evaluations written into their folders as the evaluation child does: the first copies
    its training images at the end, not at its step-1 checkpoint; the second is good. The evaluations are
    injected, so the second run is a copy of the first's folder under a job of its own (one training)."""
    jobs, configs = JobService(tmp_path), ConfigService(tmp_path)
    copier = trained_job(jobs, "copier", shapes, steps=2, save_every=1)
    copier_dir = Path(jobs.training_status(copier).run_dir)
    good, good_dir = "good-job", tmp_path / "runs" / "good-job"
    shutil.copytree(copier_dir, good_dir)
    record = jobs.store.get(copier).model_copy(update={"job_id": good, "config_name": "good", "run_dir": str(good_dir)})
    jobs.store.insert(record)
    (copier_dir / report_name(1)).write_text(report().model_dump_json())
    (copier_dir / report_name()).write_text(report(rows=COPYING).model_dump_json())
    (good_dir / report_name()).write_text(report().model_dump_json())

    diagnosis = diagnose(jobs, copier)
    copying = next(f for f in diagnosis.findings if f.rule == "evaluation-copying")
    assert copying.patch == {"dropout": 0.2, "steps": 1} and "evaluation" in {f.rule for f in diagnosis.findings}
    assert diagnosis.recommended_checkpoint.step == 1 and "evaluate-lora" in diagnosis.recommended_checkpoint.reason
    fixed = apply_fix(configs, jobs, job_id=copier, config_name=None, finding_id="evaluation-copying")
    assert configs.get(fixed.config_name).steps == 1 and configs.get(fixed.config_name).dropout == 0.2

    comparison = compare_runs(jobs, [copier, good])
    assert comparison.summary.startswith(f"best measured by evaluate-lora: {good} (likeness 0.65 vs base 0.42")
    assert f"{copier} copies" in comparison.summary
    assert comparison.runs[0].evaluation.startswith("final LoRA: ") and comparison.runs[0].evaluation.endswith("copies")
    assert "evaluation-copying" in comparison.runs[0].findings
    # Evaluations with other prompts do not compare: the validation losses (none here) decide.
    other = report().model_copy(update={"prompts": ["xyz_shape a blue square"]})
    (good_dir / report_name()).write_text(other.model_dump_json())
    assert not compare_runs(jobs, [copier, good]).summary.startswith("best measured")

