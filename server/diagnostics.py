"""diagnose-training, apply-fix and compare-training-runs: the diagnostic rules of
`training/diagnostics/` over a job's run directory, and the config changes they suggest.

A job is diagnosed from what its run directory holds: the resolved config.yaml (before the
trainer has written it, the request.yaml the job was started with), metrics.jsonl, the samples'
statistics and status.json. Nothing here loads a model; the dataset is only counted. The rules and
yaml are imported where they are used: the server imports this module at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from server.configs import ConfigService, check_dataset, check_model
from server.errors import ServiceError, WorkspaceStateError
from server.jobs import RESUMABLE_STATES, JobService, JobStatus
from server.names import free_name
from training.config import ConfigError, TrainingConfig
from training.diagnostics import Finding, preflight_findings
from training.diagnostics.checkpoints import CheckpointChoice, recommend_checkpoint
from training.diagnostics.findings import SEVERITY_ORDER
from training.jobs.queue import read_status
from training.run_files import RunFiles

if TYPE_CHECKING:
    from training.diagnostics.evidence import RunEvidence

RECENT_ROWS = 20  # training rows whose median is a run's "latest loss": single steps are noise


class RecommendedCheckpoint(CheckpointChoice):
    path: str = Field(description="The LoRA file; export-model job_id=<job> step=<step> copies a checkpoint's.")


class Diagnosis(BaseModel):
    job_id: str
    state: str
    step: int
    total_steps: int | None
    findings: list[Finding] = Field(description="Errors first, then warnings, then information.")
    recommended_checkpoint: RecommendedCheckpoint | None = Field(
        None, description="The saved LoRA to use, with the reason; keep_last_n_checkpoints never deletes it."
    )
    stop_reason: str | None = Field(None, description="Why auto_stop_on ended the run early, if it did.")
    summary: str
    next_step: str


class AppliedFix(BaseModel):
    config_name: str = Field(description="The new config, written with the finding's patch.")
    based_on: str = Field(description="The config (or job) it was copied from.")
    finding: Finding
    changes: dict[str, list[Any]] = Field(description="{option: [old value, new value]}.")
    warnings: list[str] = Field(default_factory=list)
    next_step: str


class RunSummary(BaseModel):
    job_id: str
    state: str
    step: int
    total_steps: int | None
    latest_loss: float | None = Field(description=f"Median training loss of the last {RECENT_ROWS} steps.")
    lowest_loss: float | None
    best_validation_loss: float | None
    best_validation_step: int | None
    latest_validation_loss: float | None
    it_per_s: float | None
    findings: list[str] = Field(description="Rule ids of the run's warnings and errors.")
    recommended_step: int | None
    evaluation: str | None = Field(
        None, description="What evaluate-lora measured on the run's latest evaluated LoRA, and its problems."
    )


class RunComparison(BaseModel):
    runs: list[RunSummary]
    config_differences: dict[str, dict[str, Any]] = Field(
        description="{option: {job_id: value}} for every option that is not the same in all runs."
    )
    summary: str


def diagnose(jobs: JobService, job_id: str) -> Diagnosis:
    status = jobs.training_status(job_id)
    evidence = _evidence(status)
    findings = _findings(evidence)
    choice = _recommended(status, evidence)
    stop_reason = read_status(Path(status.run_dir)).get("stop_reason")
    counts = {severity: sum(f.severity == severity for f in findings) for severity in SEVERITY_ORDER}
    summary = (
        f"{status.state} at step {status.step}/{status.total_steps or '?'}: {counts['error']} error(s), "
        f"{counts['warning']} warning(s), {counts['info']} note(s)"
    )
    fixable = [f.rule for f in findings if f.patch and f.severity != "info"]
    next_step = (
        f"explain the findings; apply-fix job_id={job_id} finding_id=<rule> writes a config with a fix "
        f"(fixable: {', '.join(fixable)})"
        + (
            f"; resume-training job_id={job_id} apply_fix=<rule> continues this run from its last checkpoint with it"
            if status.state in RESUMABLE_STATES
            else ""
        )
        if fixable
        else "nothing to fix in the config; explain the findings and, when it is done, export-model"
    )
    return Diagnosis(
        job_id=job_id,
        state=status.state,
        step=status.step,
        total_steps=status.total_steps,
        findings=findings,
        recommended_checkpoint=choice,
        stop_reason=stop_reason,
        summary=summary,
        next_step=next_step,
    )


def apply_fix(
    configs: ConfigService, jobs: JobService, *, job_id: str | None, config_name: str | None, finding_id: str
) -> AppliedFix:
    """A new config: the job's (or config's) options with the finding's patch applied."""
    if (job_id is None) == (config_name is None):
        raise ServiceError("give either job_id (from diagnose-training) or config_name (from validate-training-config)")
    if job_id is not None:
        status = jobs.training_status(job_id)
        findings = _findings(_evidence(status))
        values = _request_values(Path(status.run_dir))
        based_on = f"job {job_id}"
    else:
        findings = configs.validate(config_name).findings
        import yaml

        values = yaml.safe_load(configs.get_yaml(config_name)) or {}
        based_on = f"config {config_name}"
    finding = pick_finding(findings, finding_id, based_on)
    # A job's findings read its resolved config: its rank and alpha go back under the names the job was given.
    try:
        patch = TrainingConfig.from_dict(values).in_given_names(finding.patch)
    except ConfigError as exc:  # a job's config from an older version, or a hand edit since
        raise WorkspaceStateError(
            f"the config of {based_on} no longer validates ({'; '.join(exc.problems)}): fix it with "
            "update-training-config, or create a new config with the finding's patch"
        ) from None
    name = free_name(f"{values.get('name', 'config')}-fix-{finding_id}", configs.exists)
    changes = {key: [values.get(key), value] for key, value in patch.items() if values.get(key) != value}
    config = configs.create({**values, **patch, "name": name})
    described = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items())
    return AppliedFix(
        config_name=name,
        based_on=based_on,
        finding=finding,
        changes=changes,
        warnings=config.warnings(),
        next_step=f"tell the user what changed ({described}) and why; then validate-training-config name={name} "
        f"and, if they agree, start-training config_name={name}",
    )


def pick_finding(findings: list[Finding], finding_id: str, based_on: str) -> Finding:
    """The finding `finding_id` with a config change (apply-fix, resume-training's apply_fix), or the refusal that
    lists the findings there are."""
    finding = next((f for f in findings if f.rule == finding_id), None)
    if finding is None:
        listed = ", ".join(f"{f.rule} ({f.severity})" for f in findings) or "none"
        raise WorkspaceStateError(f"{based_on} has no finding {finding_id!r}; its findings now: {listed}")
    if not finding.patch:
        raise WorkspaceStateError(
            f"finding {finding_id!r} has no config change to apply; its advice is: {finding.message}"
        )
    return finding


def job_findings(status: JobStatus) -> list[Finding]:
    """What diagnose-training finds in a training job now."""
    return _findings(_evidence(status))


def compare_runs(jobs: JobService, job_ids: list[str]) -> RunComparison:
    if not 2 <= len(job_ids) <= 8 or len(set(job_ids)) != len(job_ids):
        raise ServiceError("give 2 to 8 different job ids (list-training-jobs shows them)")
    statuses = [jobs.training_status(job_id) for job_id in job_ids]
    evidences = [_evidence(status) for status in statuses]
    runs = [_summary(status, evidence) for status, evidence in zip(statuses, evidences)]
    dumps = {s.job_id: e.config.model_dump(mode="json", exclude={"name"}) for s, e in zip(statuses, evidences)}
    keys = sorted({key for dump in dumps.values() for key in dump})
    differences = {
        key: {job_id: dump.get(key) for job_id, dump in dumps.items()}
        for key in keys
        if len({repr(dump.get(key)) for dump in dumps.values()}) > 1
    }
    scored = [r for r in runs if r.best_validation_loss is not None]
    # Validation losses compare only over the same held-out images: same dataset, split and seed.
    held_out = {(e.config.dataset_path, e.config.validation_split, e.config.seed) for e in evidences}
    measured = _evaluation_ranking(job_ids, evidences)
    if measured is not None:
        summary = measured
    elif len(scored) < len(runs):
        summary = (
            "not every run scored a validation loss (set validation_split, or give the dataset a validation "
            "folder): compare their samples with get-training-samples"
        )
    elif len(held_out) > 1:
        summary = (
            "the runs held out different images (dataset, validation_split or seed differ), so their validation "
            "losses do not compare: compare their samples with get-training-samples"
        )
    else:
        best = min(scored, key=lambda r: r.best_validation_loss)
        summary = (
            f"lowest validation loss: {best.job_id} "
            f"({best.best_validation_loss:.4f} at step {best.best_validation_step})"
        )
    return RunComparison(runs=runs, config_differences=differences, summary=summary)


# --- helpers -----------------------------------------------------------------------------------
def _evidence(status: JobStatus) -> RunEvidence:
    """The run's evidence, with its dataset counted and the model's native size read."""
    from training.diagnostics.evidence import RunEvidence

    run_dir = Path(status.run_dir)
    if (run_dir / "config.yaml").exists():
        evidence = RunEvidence.from_run_dir(run_dir)
    else:  # queued, or failed before the trainer wrote its resolved config
        evidence = RunEvidence(config=_request_config(run_dir), state=status.state, error=status.error)
    config = evidence.config
    errors: list[str] = []
    dataset = check_dataset(
        config.dataset_path,
        trigger_word=config.trigger_word,
        trigger_words=config.trigger_words,
        instance_prompt=config.instance_prompt,
        errors=errors,
        warnings=[],
        validation_split=config.validation_split,
        seed=config.seed,
    )
    native, family = check_model(
        config.model_name, config.base_model_config, errors=errors, model_family=config.model_family
    )
    images = dataset.num_images if dataset is not None else None
    return evidence.model_copy(update={"images": images, "native_resolution": native, "model_family": family})


def _findings(evidence: RunEvidence) -> list[Finding]:
    from training.diagnostics.evaluation_rules import with_evaluation
    from training.diagnostics.rules import training_findings

    seen: set[str] = set()
    findings = []
    for finding in with_evaluation(evidence, training_findings(evidence)) + preflight_findings(evidence):
        if finding.rule not in seen:  # a live finding wins over the pre-flight one of the same id
            seen.add(finding.rule)
            findings.append(finding)
    return sorted(findings, key=lambda f: SEVERITY_ORDER[f.severity])


def _recommended(status: JobStatus, evidence: RunEvidence) -> RecommendedCheckpoint | None:
    files = RunFiles(Path(status.run_dir))
    saved = {step: next(folder.glob("*.safetensors"), None) for step, folder in files.list_checkpoints()}
    if status.lora_path and Path(status.lora_path).is_file():
        saved[status.step] = Path(status.lora_path)
    saved = {step: path for step, path in saved.items() if path is not None}
    choice = recommend_checkpoint(evidence, sorted(saved))
    if choice is None:
        return None
    return RecommendedCheckpoint(step=choice.step, reason=choice.reason, path=str(saved[choice.step]))


def _summary(status: JobStatus, evidence: RunEvidence) -> RunSummary:
    import statistics

    losses = [row.loss for row in evidence.train]
    scored = [row for row in evidence.validation if row.step > 0]
    best = min(scored, key=lambda row: row.loss) if scored else None
    choice = _recommended(status, evidence)
    return RunSummary(
        job_id=status.job_id,
        state=status.state,
        step=status.step,
        total_steps=status.total_steps,
        latest_loss=statistics.median(losses[-RECENT_ROWS:]) if losses else None,
        lowest_loss=min(losses) if losses else None,
        best_validation_loss=best.loss if best else None,
        best_validation_step=best.step if best else None,
        latest_validation_loss=scored[-1].loss if scored else None,
        it_per_s=status.it_per_s,
        findings=[f.rule for f in _findings(evidence) if f.severity != "info"],
        recommended_step=choice.step if choice else None,
        evaluation=_evaluation_line(evidence),
    )


def _evaluation_line(evidence: RunEvidence) -> str | None:
    from training.diagnostics.evaluation_rules import latest_evaluation
    from training.diagnostics.evaluation_scores import judge

    report = latest_evaluation(evidence)
    if report is None:
        return None
    judgement = judge(report)
    which = "final LoRA" if report.step is None else f"step {report.step}"
    problems = f"; {' and '.join(judgement.problems)}" if judgement.problems else ""
    return f"{which}: {judgement.line()}{problems}"


def _evaluation_ranking(job_ids: list[str], evidences: list[RunEvidence]) -> str | None:
    """The best run by what evaluate-lora measured, when every run has an evaluation scored with the same
    prompts, seeds and models (otherwise the numbers do not compare); None otherwise."""
    from training.diagnostics.evaluation_rules import latest_evaluation
    from training.diagnostics.evaluation_scores import best_of, comparable, judge

    reports = [latest_evaluation(evidence) for evidence in evidences]
    if any(report is None for report in reports) or not comparable(reports):
        return None
    judged = {job_id: judge(report) for job_id, report in zip(job_ids, reports)}
    problems = "; ".join(f"{job_id} {' and '.join(j.problems)}" for job_id, j in judged.items() if j.problems)
    best = best_of(judged)
    if best is None and not problems:  # no run's likeness measured (no training images to compare with)
        return None
    if best is None:
        return f"evaluate-lora found a problem in every run ({problems}): see diagnose-training for the fixes"
    others = f"; {problems}" if problems else ""
    return f"best measured by evaluate-lora: {best} ({judged[best].line()}){others}"


def _request_values(run_dir: Path) -> dict[str, Any]:
    """The options the job was started with (not the resolved ones: defaults stay defaults)."""
    import yaml

    try:
        values = yaml.safe_load((run_dir / "request.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise WorkspaceStateError(f"the job's config {run_dir / 'request.yaml'} cannot be read: {exc}") from None
    if not isinstance(values, dict):
        raise WorkspaceStateError(f"the job's config {run_dir / 'request.yaml'} is not a mapping of options")
    return values


def _request_config(run_dir: Path) -> TrainingConfig:
    try:
        return TrainingConfig.from_dict(_request_values(run_dir))
    except ConfigError as exc:
        raise WorkspaceStateError(f"the job's config no longer validates: {exc}") from None

