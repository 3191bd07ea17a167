"""Diagnostics end to end on the tiny model: what a run records, what diagnose-training finds in it,
the fixes apply-fix writes, the recommended checkpoint, auto_stop_on and compare-training-runs.

Runs train in this process (run_training) into a job's run directory: these tests are about the
evidence and the rules, not about processes, which test_jobs.py covers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import fast_config

from server.configs import ConfigService
from server.diagnostics import apply_fix, compare_runs, diagnose
from server.errors import ServiceError
from server.jobs import JobService
from training.diagnostics.checkpoints import recommend_checkpoint
from training.diagnostics.evidence import RunEvidence, SampleRow, ValidationRow
from training.jobs.store import JobRecord
from training.run_files import RunFiles
from training.sampling import control_prompt
from training.trainer import run_training

SAMPLED = dict(disable_sampling=False, test_prompts=["xyz_shape a red circle"], sample_steps=2)


@pytest.fixture
def services(tmp_path, tiny_sd15) -> tuple[JobService, ConfigService]:
    return JobService(tmp_path), ConfigService(tmp_path)


def trained_job(jobs: JobService, name: str, dataset: Path, **options) -> str:
    """A job whose run trained here, recorded in the job table with the trainer's final state."""
    config = fast_config(dataset, name=name, **options)
    job_id = f"{name}-job"
    run_dir = jobs.workspace / "runs" / job_id
    run_dir.mkdir(parents=True)
    (run_dir / "request.yaml").write_text(config.to_yaml())
    result = run_training(config, run_dir)
    jobs.store.insert(
        JobRecord(
            job_id=job_id,
            config_name=name,
            state=result.state,
            run_dir=str(run_dir),
            created_at=time.time(),
            started_at=time.time(),
            finished_at=time.time(),
            error=result.error,
        )
    )
    return job_id


def test_an_absurd_learning_rate_is_diagnosed_as_a_non_finite_loss_and_fixed(services, shapes):
    jobs, configs = services
    job_id = trained_job(jobs, "absurd", shapes, learning_rate=10.0, max_grad_norm=0.0, steps=30)
    diagnosis = diagnose(jobs, job_id)
    assert diagnosis.state == "failed"
    first = diagnosis.findings[0]
    assert first.rule == "non-finite-loss" and first.severity == "error"
    assert first.patch == {"learning_rate": 1e-4, "max_grad_norm": 1.0}

    fixed = apply_fix(configs, jobs, job_id=job_id, config_name=None, finding_id="non-finite-loss")
    assert fixed.config_name == "absurd-fix-non-finite-loss"
    assert fixed.changes == {"learning_rate": [10.0, 1e-4], "max_grad_norm": [0.0, 1.0]}
    report = configs.validate(fixed.config_name)
    assert report.valid, report.errors
    assert configs.get(fixed.config_name).steps == 30  # everything else as the job had it
    again = apply_fix(configs, jobs, job_id=job_id, config_name=None, finding_id="non-finite-loss")
    assert again.config_name == "absurd-fix-non-finite-loss-2"  # the first fix is not overwritten


def test_a_tiny_learning_rate_is_diagnosed_as_no_effect(services, shapes):
    jobs, configs = services
    job_id = trained_job(jobs, "timid", shapes, learning_rate=1e-9, steps=4, sample_every=4, **SAMPLED)
    diagnosis = diagnose(jobs, job_id)
    finding = next(f for f in diagnosis.findings if f.rule == "no-effect")
    assert finding.severity == "warning"
    assert finding.patch == {"learning_rate": 5e-5, "steps": 6}  # raised into the guide's range, not to 2e-9
    fixed = apply_fix(configs, jobs, job_id=job_id, config_name=None, finding_id="no-effect")
    assert configs.validate(fixed.config_name).valid

    with pytest.raises(ServiceError, match="no finding 'loss-spike'.*no-effect"):
        apply_fix(configs, jobs, job_id=job_id, config_name=None, finding_id="loss-spike")
    info = next(f for f in diagnosis.findings if not f.patch)
    with pytest.raises(ServiceError, match="no config change"):
        apply_fix(configs, jobs, job_id=job_id, config_name=None, finding_id=info.rule)


def test_a_healthy_short_run_gets_only_the_pre_flight_warnings_of_its_test_config(services, shapes):
    jobs, _ = services
    job_id = trained_job(jobs, "healthy", shapes, learning_rate=1e-3, steps=4, sample_every=2, **SAMPLED)
    diagnosis = diagnose(jobs, job_id)
    warnings = {f.rule for f in diagnosis.findings if f.severity != "info"}
    assert warnings == {"steps-vs-images", "learning-rate"}, diagnosis.findings  # 4 steps at 1e-3, on purpose
    assert {f.rule for f in diagnosis.findings} >= {"training-time"}


def test_auto_stop_on_no_effect_stops_the_run_and_says_why(services, shapes):
    jobs, _ = services
    job_id = trained_job(
        jobs, "stuck", shapes, learning_rate=1e-9, steps=40, validation_every=4, auto_stop_on=["no_effect"]
    )
    diagnosis = diagnose(jobs, job_id)
    assert diagnosis.state == "stopped" and diagnosis.step == 12  # met at steps 4, 8 and 12: three checks in a row
    assert diagnosis.stop_reason.startswith("auto_stop_on no_effect: the LoRA has no visible effect")
    run = Path(jobs.status(job_id).run_dir)
    assert (run / "checkpoints" / "step000012").is_dir()  # stopped like stop-training: resumable


def test_the_recommended_checkpoint_survives_pruning(services, shapes):
    """Validation loss is lowest early in a run that diverges; keep_last_n_checkpoints=1 keeps the
    latest checkpoint and the recommended one, never only the latest."""
    jobs, _ = services
    job_id = trained_job(
        jobs,
        "diverging",
        shapes,
        learning_rate=0.3,  # validation loss is lowest at step 2 (1.114), then rises to 1.14-1.17
        steps=6,
        save_every=1,
        keep_last_n_checkpoints=1,
        validation_split=0.25,
        validation_every=1,
    )
    run = Path(jobs.status(job_id).run_dir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validation = {r["step"]: r["loss"] for r in rows if r.get("kind") == "validation"}
    assert sorted(validation) == list(range(7)) and validation[1] != validation[0]
    assert len({r["files"][0] for r in rows if "kind" not in r}) == 3  # one of the 4 images is held out

    choice = diagnose(jobs, job_id).recommended_checkpoint
    best = min((step for step in validation if step > 0), key=validation.get)
    kept = sorted(step for step, _ in RunFiles(run).list_checkpoints())
    assert best < 5, validation  # otherwise pruning would have nothing to spare
    assert choice.step == best and f"at step {best}" in choice.reason and "risen to" in choice.reason
    assert kept == [best, 5]  # step 6 is the final LoRA, not a checkpoint
    assert Path(choice.path).is_file()


def test_compare_training_runs_shows_what_differs(services, shapes):
    jobs, _ = services
    slow = trained_job(jobs, "slow", shapes, learning_rate=1e-4, steps=3, validation_split=0.25, validation_every=3)
    fast = trained_job(jobs, "fast", shapes, learning_rate=1e-3, steps=3, validation_split=0.25, validation_every=3)
    comparison = compare_runs(jobs, [slow, fast])
    assert comparison.config_differences == {"learning_rate": {slow: 1e-4, fast: 1e-3}}
    assert [run.job_id for run in comparison.runs] == [slow, fast]
    assert all(run.best_validation_step == 3 and run.latest_loss > 0 for run in comparison.runs)
    assert comparison.summary.startswith("lowest validation loss:")
    with pytest.raises(ServiceError, match="2 to 8"):
        compare_runs(jobs, [slow])
    other = trained_job(jobs, "other", shapes, steps=3, validation_split=0.25, validation_every=3, seed=7)
    assert "held out different images" in compare_runs(jobs, [slow, other]).summary


def test_a_config_finding_is_fixed_into_a_new_config(services, shapes):
    _, configs = services
    configs.create(fast_config(shapes, name="long", steps=5000).model_dump(mode="json", exclude_none=True))
    report = configs.validate("long")
    assert [f.rule for f in report.findings if f.rule == "steps-vs-images"] == ["steps-vs-images"]
    fixed = apply_fix(configs, None, job_id=None, config_name="long", finding_id="steps-vs-images")
    assert fixed.changes == {"steps": [5000, 400]} and configs.validate(fixed.config_name).valid
    assert configs.get("long").steps == 5000  # the original is kept


# --- the recommendation on its own ---------------------------------------------------------------
def evidence(**values) -> RunEvidence:
    return RunEvidence(config=fast_config(Path("d"), steps=100), **values)


def test_the_lowest_validation_loss_picks_the_nearest_saved_lora():
    scores = [(0, 1.0), (20, 0.6), (40, 0.5), (60, 0.7)]
    rows = [ValidationRow(step=step, loss=loss, images=2) for step, loss in scores]
    choice = recommend_checkpoint(evidence(validation=rows), [25, 50, 75, 100])
    assert choice.step == 50 and "0.5000 at step 40" in choice.reason and "risen to 0.7000" in choice.reason


def test_without_validation_the_samples_decide():
    def sample(step: int, baseline: float, nearest: float) -> SampleRow:
        return SampleRow(
            step=step,
            prompt_index=0,
            prompt="p",
            file="f",
            baseline_distance=baseline,
            nearest_training_distance=nearest,
        )

    rows = [sample(25, 0.05, 0.2), sample(50, 0.1, 0.1), sample(75, 0.12, 0.03)]  # copies its data at 75
    choice = recommend_checkpoint(evidence(samples=rows), [25, 50, 75])
    assert choice.step == 50 and "without copying" in choice.reason
    assert recommend_checkpoint(evidence(), [25, 50]).step == 50
    assert recommend_checkpoint(evidence(), []) is None


def test_pruning_keeps_the_step_it_is_told_to(tmp_path):
    files = RunFiles(tmp_path)
    files.create()
    for step in (1, 2, 3, 4):
        files.checkpoint(step).mkdir()
    files.prune_checkpoints(1, also_keep=2)
    assert [step for step, _ in files.list_checkpoints()] == [2, 4]


def test_the_control_prompt_is_the_first_test_prompt_without_its_trigger_word():
    def control(**values) -> str | None:
        return control_prompt(fast_config(Path("d"), **values))

    assert control(test_prompts=["xyz_shape, a red circle, studio light"]) == "a red circle, studio light"
    assert control(test_prompts=["a red circle"]) is None  # no trigger word: it would be a test prompt again
    assert control(test_prompts=["xyz_shape"]) is None  # nothing left
    assert control(test_prompts=["xyz_shapes on xyz_shape"]) == "xyz_shapes on"  # whole tags only
    assert control(test_prompts=["xyz_shape dog"], control_prompt="a cat") == "a cat"
    assert control() is None


def test_a_rank_fix_changes_the_kohya_name_a_config_uses(services, shapes):
    _, configs = services
    configs.create(fast_config(shapes, name="kohya-names", network_dim=128).model_dump(mode="json", exclude_none=True))
    assert "rank-for-dataset" in [f.rule for f in configs.validate("kohya-names").findings]
    fixed = apply_fix(configs, None, job_id=None, config_name="kohya-names", finding_id="rank-for-dataset")
    assert fixed.changes == {"network_dim": [128, 32]}
    assert configs.get(fixed.config_name).effective_rank == 32  # the fix takes effect
