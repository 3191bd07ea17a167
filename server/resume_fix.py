"""resume-training, with or without `apply_fix`: a stopped, failed or interrupted job continued from its last
checkpoint, with the config change of one of its findings (diagnose-training's) when asked, such as the
out-of-memory finding's batch 1 and gradient checkpointing. Both the run's config.yaml (what `lora-train --resume`
reads) and its request.yaml (the options the job was started with, which apply-fix copies) take the patch. What a
checkpoint cannot continue under (rank, alpha, model, dataset: training.resume_source.RESUME_FIXED) and a step
count the run has already passed are refused with the way that works: apply-fix writes a new config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from server.diagnostics import job_findings, pick_finding
from server.errors import WorkspaceStateError
from server.jobs import RESUMABLE_STATES, JobService, JobStatus
from training.config import ConfigError, TrainingConfig
from training.resume_source import RESUME_FIXED
from training.run_files import RunFiles
from training.workspace import atomic_write_text


class ResumedJob(JobStatus):
    applied_fix: str | None = Field(None, description="The finding whose config change the job resumed with.")
    changes: dict[str, list[Any]] = Field(
        default_factory=dict, description="With apply_fix: {option: [old value, new value]} in the run's config."
    )


def resume_job(jobs: JobService, job_id: str, apply_fix: str | None = None) -> ResumedJob:
    if apply_fix is None:
        jobs.resume(job_id)
        return ResumedJob(**jobs.status(job_id).model_dump())
    status = jobs.training_status(job_id)
    if status.state not in RESUMABLE_STATES:  # before the findings are read; check_resume checks again
        raise WorkspaceStateError(
            f"job {job_id} is {status.state}; only a stopped, interrupted or failed job can be resumed"
        )
    run_dir = Path(status.run_dir)
    finding = pick_finding(job_findings(status), apply_fix, f"job {job_id}")
    _check_fix_resumable(job_id, run_dir, apply_fix, finding.patch)
    before, after, changes = _patched(run_dir, finding.patch)
    # every refusal of resume before the run's files change: a refused fix leaves them as they were, and a second
    # apply_fix out-of-memory does not take the ladder's next step from a patch that never ran
    jobs.check_resume(job_id, after.get(run_dir / "config.yaml") or after.get(run_dir / "request.yaml"))
    _write(after)
    try:
        jobs.resume(job_id)
    except Exception:  # its state changed since the check (another call resumed or deleted it)
        _write(before)
        raise
    return ResumedJob(**jobs.status(job_id).model_dump(), applied_fix=apply_fix, changes=changes)


def _check_fix_resumable(job_id: str, run_dir: Path, finding_id: str, patch: dict) -> None:
    """What a checkpoint cannot take from this finding's patch, refused with the way that works (a new run)."""
    new_run = f"apply-fix job_id={job_id} finding_id={finding_id} writes a new config with it instead"
    fixed = [key for key in patch if key in RESUME_FIXED]
    if fixed:
        raise WorkspaceStateError(
            f"finding {finding_id!r} changes {', '.join(fixed)}, which a run cannot change on resume "
            f"({RESUME_FIXED[fixed[0]]}): {new_run} (with resume_from: {run_dir} it starts from this run's LoRA)"
        )
    checkpoints = RunFiles(run_dir).list_checkpoints()
    last = checkpoints[-1][0] if checkpoints else 0
    if "steps" in patch and patch["steps"] <= last:
        raise WorkspaceStateError(
            f"finding {finding_id!r} ends the run at step {patch['steps']}, and its last checkpoint is at step "
            f"{last} already: export-model job_id={job_id} step=<step> takes a checkpoint's LoRA, or {new_run}"
        )


def _patched(run_dir: Path, patch: dict) -> tuple[dict[Path, str], dict[Path, str], dict[str, list[Any]]]:
    """The patch applied to the run's resolved config.yaml (where the trainer has written it) and its request.yaml
    (under the names the job was given), both validated, nothing written: their texts before and after, and
    {option: [old, new]}."""
    import yaml

    before: dict[Path, str] = {}
    after: dict[Path, str] = {}
    changes: dict[str, list[Any]] = {}
    for path in (run_dir / "config.yaml", run_dir / "request.yaml"):
        if not path.is_file():
            continue  # no config.yaml: it failed before the trainer wrote one, and starts afresh from request.yaml
        try:
            before[path] = path.read_text(encoding="utf-8")
            values = yaml.safe_load(before[path]) or {}
            was = TrainingConfig.from_dict(values)
            given = patch if path.name == "config.yaml" else was.in_given_names(patch)
            now = TrainingConfig.from_dict({**values, **given})
        except (OSError, yaml.YAMLError, ConfigError) as exc:
            raise WorkspaceStateError(f"the job's config {path} cannot take the fix: {exc}") from None
        # config.yaml is the resolved config; request.yaml keeps only what the job was given, plus the patch (a
        # later apply-fix copies it, and must not pin every default this version resolved)
        resolved = path.name == "config.yaml"
        after[path] = now.to_yaml() if resolved else yaml.safe_dump({**values, **given}, sort_keys=False)
        for key in patch:
            if getattr(was, key) != getattr(now, key):
                changes.setdefault(key, [getattr(was, key), getattr(now, key)])
    return before, after, changes


def _write(texts: dict[Path, str]) -> None:
    for path, text in texts.items():
        atomic_write_text(path, text)
