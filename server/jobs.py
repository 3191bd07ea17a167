"""Background jobs as the tools see them: start, stop, resume, delete and prune jobs, and their status.

Five kinds of job share the table: `training` (a `lora-train` process), `captioning` (a
`python -m training.captioning` process, for generate-captions on a long set), `generation`
(`python -m training.generation`, for generate-image with a real model), `download`
(`python -m training.downloads`, a base model from the Hugging Face hub; a training of that model waits
for it) and `evaluation` (`python -m training.evaluation.run`, evaluate-lora). The table, the devices each job
takes, the claim of queued jobs and their child processes are the queue's, in `training.jobs` (below the
server: a child that ends starts the next queued job with no server running); this module keeps the
rules of the calls and words their refusals. A job's progress is read from its run directory
(status.json, train.log), which the child writes atomically.

A stop writes the run directory's `stop-request` file (and signals the child where signals exist); the
child finishes its step, saves and ends `stopped`. `refresh()` reconciles the table with the processes:
it is called on start-up, by every read, and by the server's monitor loop.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field

from server.errors import ServiceError, WorkspaceStateError
from server.names import checked_name
from training import processes
from training.config import TrainingConfig
from training.evaluation.request import EvaluationJob
from training.jobs import cleanup
from training.jobs.devices import captioning_devices, training_devices
from training.jobs.queue import STOP_TIMEOUT_S, JobQueue, read_status
from training.jobs.store import CPU, FINAL_STATES, JobKind, JobRecord, JobState, QueueError
from training.resume_source import resume_conflicts
from training.run_files import RunFiles
from training.workspace import atomic_write_text

RESUMABLE_STATES = ("stopped", "interrupted", "failed")
CANCELLED = "cancelled before it started (stopped while queued); resume-training queues it again"

log = logging.getLogger("server")


class JobProcess(BaseModel):
    rank: int = Field(description="The process's global rank (0 writes the run's files).")
    pid: int
    host: str | None = None
    device: str | None = Field(None, description="'cuda:0', 'cpu', ...")


class JobStatus(BaseModel):
    job_id: str
    kind: JobKind = Field(
        "training",
        description="training (start-training), captioning (generate-captions on a long set), generation "
        "(generate-image / compare-lora-strengths with a real model), download (a base model from the Hugging "
        "Face hub: download-base-model, or start-training for a model that is not here yet) or evaluation "
        "(evaluate-lora)",
    )
    config_name: str = Field(
        description="The config trained; for a captioning job, the dataset; for a download job, the model id; "
        "for an evaluation job, the training job (or LoRA file) evaluated."
    )
    state: JobState = Field(description="queued, running, completed, failed, stopped or interrupted")
    step: int = Field(
        0, description="Optimizer steps done; for a captioning job, images captioned; for a download job, files."
    )
    total_steps: int | None = None
    percent: float | None = Field(None, description="step / total_steps x 100 (a download: bytes_done / bytes_total)")
    bytes_done: int | None = Field(
        None, description="A download job: bytes of the model in the cache so far (partial files included)."
    )
    bytes_total: int | None = Field(None, description="A download job: bytes of the files the pipeline needs.")
    bytes_per_s: int | None = Field(
        None, description="A download job: the speed of this run's bytes (a resumed job counts from its restart)."
    )
    waits_for: str | None = Field(
        None,
        description="A queued job that starts only once this job completes (a training waiting for the download "
        "of its model); if that job fails, this one fails with its error.",
    )
    loss: float | None = Field(None, description="smoothed training loss")
    lr: float | None = None
    grad_norm: float | None = Field(
        None,
        description="The last step's gradient norm, before clipping (max_grad_norm), next to loss and lr. The guide "
        "wants it stable, not exploding: a climb or large spikes mean the learning rate is too high (lower "
        "learning_rate); diagnose-training reads the whole history.",
    )
    it_per_s: float | None = None
    eta_s: float | None = Field(None, description="estimated seconds to completion")
    phase: str | None = Field(
        None,
        description="While running, what the trainer is doing: 'setting up', 'caching latents 640/2000', "
        "'caching text 300/2000' (the encoding before step 1, slow on a large dataset) or 'training'.",
    )
    last_checkpoint: str | None = None
    latest_samples: list[str] = Field(default_factory=list)
    lora_path: str | None = None
    exported_lora: str | None = Field(
        None,
        description="A completed training job's final LoRA as list-exported-models names it: '<config name>', or "
        "'<config name>-2', ... when another job's LoRA has that name.",
    )
    error: str | None = None
    warnings: list[str] = Field(
        default_factory=list,
        description="A training job: the latest problems it met and went on from (a round of samples abandoned "
        "past sample_timeout_s, GPU memory spilling into shared memory); diagnose-training explains them with their "
        "fixes.",
    )
    verdicts: list[str] = Field(
        default_factory=list,
        description="A completed evaluation job: what evaluate-lora measured, in plain sentences with the numbers "
        "(the best strength, likeness against the base model, prompt adherence, style bleed, collapse); "
        "lora://jobs/{job_id}/evaluation has every score.",
    )
    devices: list[str] = Field(
        default_factory=list,
        description="While running, the GPUs the job holds (CUDA ids: its child sees only these), or ['cpu'] "
        "where the machine has no GPU and the job holds the machine (every device for a job started by a version that "
        "did not record them); empty when it holds none (queued, finished, "
        "or a job that needs no device such as template captioning).",
    )
    processes: list[JobProcess] = Field(
        default_factory=list,
        description="The training processes of a running data-parallel job (num_processes > 1), by rank.",
    )
    run_dir: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None


class JobDeleted(BaseModel):
    job_id: str
    run_dir: str
    run_dir_removed: bool = Field(
        description="Whether the run directory was removed (false when the job's row named a folder outside the "
        "workspace's runs/, which is left as it is)."
    )
    freed_bytes: int
    note: str = "LoRAs exported outside the run directory (export-lora, another folder) are kept."


class PruneRequest(BaseModel):
    """prune-runs: the space of finished jobs."""

    job_id: str | None = Field(None, description="One finished job; default: every finished job.")
    keep_checkpoints: int = Field(
        1,
        description="Newest checkpoints to keep in each run, at least 1 (the one diagnose-training recommends is "
        "kept too).",
    )
    caches: bool = Field(True, description="Also delete the latent and text caches.")
    dry_run: bool = Field(False, description="Only report what would be deleted and the sizes.")


class PrunedRun(BaseModel):
    job_id: str
    bytes_before: int
    bytes_after: int
    removed: list[str] = Field(description="What was removed (or, in a dry run, would be), relative to the run.")


class PruneReport(BaseModel):
    runs: list[PrunedRun]
    bytes_before: int = Field(description="The pruned runs' size before, in all.")
    bytes_after: int = Field(description="Their size after (in a dry run: what it would be).")
    dry_run: bool


class JobService:
    def __init__(self, workspace: Path, *, python: str = sys.executable, stop_timeout: float = STOP_TIMEOUT_S):
        self.workspace = workspace
        self.queue = JobQueue(workspace, python=python, stop_timeout=stop_timeout)
        self.store = self.queue.store

    # --- commands ------------------------------------------------------------------------------
    def start(self, config_name: str, config_yaml: str, *, after: str | None = None) -> JobRecord:
        """Queue a training job for a config's YAML, as given (it is copied, so later edits do not change it),
        to start once job `after` (a download) has completed. Front ends start saved configs through
        `TrainingService.start`, which validates them first."""
        checked_name("config", config_name)
        try:
            devices = training_devices(config_yaml, self.queue.machine)
        except QueueError as exc:
            raise ServiceError(str(exc)) from None
        return self._queue("training", config_name, config_name, "request.yaml", config_yaml, devices, after=after)

    def start_download(self, repo_id: str, *, join: bool = False) -> JobRecord:
        """Queue the download of a hub model (training/downloads.py); it takes no device. `join`: a download
        of it already queued or running is returned instead of refused."""
        prefix = f"download-{repo_id.split('/')[-1][:40]}"
        request = json.dumps({"repo_id": repo_id})
        return self._queue("download", repo_id, prefix, "request.json", request, 0, join=join)

    def start_captioning(self, dataset_label: str, request_json: str) -> JobRecord:
        """Queue a captioning job: `request_json` is a training.captioning.CaptionJob."""
        checked_name("dataset", dataset_label)
        devices = captioning_devices(json.loads(request_json)["caption_model"])
        return self._queue(
            "captioning", dataset_label, f"captions-{dataset_label}", "request.json", request_json, devices
        )

    def start_generation(self, label: str, request_json: str) -> JobRecord:
        """Queue an image generation job: `request_json` is a training.generation.GenerationRequest."""
        checked_name("job", label)
        return self._queue("generation", label, f"images-{label}", "request.json", request_json, 1)

    def start_evaluation(self, subject: str, label: str, request: Callable[[Path], EvaluationJob]) -> JobRecord:
        """Queue an evaluate-lora job of `subject` (the training job evaluated, or the LoRA file): `request(run_dir)`
        is its EvaluationJob, given the job's own folder (where the report of a LoRA from no run here goes)."""
        checked_name("job", label)
        prefix, written = f"eval-{label}", lambda run_dir: request(run_dir).model_dump_json()
        return self._queue("evaluation", subject, prefix, "request.json", written, 1)

    def _queue(
        self,
        kind: JobKind,
        subject: str,
        prefix: str,
        request_name: str,
        request: str | Callable[[Path], str],
        devices: int,
        *,
        after: str | None = None,
        join: bool = False,
    ) -> JobRecord:
        job_id = f"{prefix}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
        run_dir = self.workspace / "runs" / job_id
        run_dir.mkdir(parents=True)
        text = request if isinstance(request, str) else request(run_dir)
        atomic_write_text(run_dir / request_name, text)  # before the row: a job claimed at once finds it
        record = JobRecord(
            job_id=job_id,
            kind=kind,
            config_name=subject,
            state="queued",
            run_dir=str(run_dir),
            created_at=time.time(),
            devices_wanted=devices,
            after_job=after,
        )
        active = self.store.insert_unless_active(record)
        if active is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
            if join:
                return active
            what = {"training": "config", "download": "model"}.get(kind, "dataset")
            raise WorkspaceStateError(
                f"{what} {subject!r} already has {kind} job {active.job_id} ({active.state}); watch it with "
                "get-training-status, or stop-training it first"
            )
        self.refresh()
        return self._record(job_id)

    def stop(self, job_id: str) -> JobRecord:
        record = self._record(job_id)
        if record.state == "queued":
            cancelled = {"state": "stopped", "finished_at": time.time(), "error": CANCELLED}
            if not self.store.update(job_id, only_if={"state": "queued"}, **cancelled):
                return self.stop(job_id)  # started (or stopped) since it was read: stop it as it is now
        elif record.state == "running":
            try:
                RunFiles(Path(record.run_dir)).request_stop()  # read by the child after each step, on every platform
            except OSError as exc:  # a full disk, a removed run directory: the signal and the kill still stop it
                log.warning("could not write the stop request of %s: %s", job_id, exc)
            if record.pid:
                processes.interrupt_group(record.pid)  # the fast path, where signals exist
            self.store.update(job_id, stop_requested_at=time.time())
        else:
            raise WorkspaceStateError(f"job {job_id} is already {record.state}; nothing to stop")
        return self._record(job_id)

    def resume(self, job_id: str) -> JobRecord:
        record, fields = self.check_resume(job_id)
        RunFiles(Path(record.run_dir)).clear_stop_request()  # left by a stop the child never read
        if not self.store.update(job_id, only_if={"state": record.state}, **fields):
            return self.resume(job_id)  # resumed by another call meanwhile: say what it is now
        self.refresh()
        return self._record(job_id)

    def check_resume(self, job_id: str, config_text: str | None = None) -> tuple[JobRecord, dict]:
        """resume's refusals, changing nothing: the job's state, the devices its config asks for, and what its latest
        checkpoint cannot continue under. `config_text` is the config it would resume with when that is not yet
        written (resume-training apply_fix checks its patched config before writing it); by default the run's own.
        Returns the job and its table's fields for the resume."""
        record = self._record(job_id)
        if record.state not in RESUMABLE_STATES:
            raise WorkspaceStateError(
                f"job {job_id} is {record.state}; only a stopped, interrupted or failed job can be resumed"
            )
        run_dir = Path(record.run_dir)
        fields = {"state": "queued", "resume": 1, "error": None, "finished_at": None, "stop_requested_at": None}
        if record.kind != "training":
            return record, fields
        if config_text is None:
            config = run_dir / "config.yaml" if (run_dir / "config.yaml").is_file() else run_dir / "request.yaml"
            try:
                config_text = config.read_text(encoding="utf-8")
            except OSError:
                return record, fields  # no config left: the trainer's resume says what is missing
        try:  # the run's config may have been given another num_processes since
            fields["devices_wanted"] = training_devices(config_text, self.queue.machine)
        except QueueError as exc:
            raise ServiceError(str(exc)) from None
        self._check_checkpoint_fits(config_text, run_dir)
        return record, fields

    @staticmethod
    def _check_checkpoint_fits(config_text: str, run_dir: Path) -> None:
        """Refuse at once, as the trainer would before loading the model, a config whose rank, alpha, model or dataset
        differs from the latest checkpoint's (an exact resume cannot change them)."""
        try:
            changed = resume_conflicts(TrainingConfig.from_yaml(config_text), run_dir)
        except (OSError, ValueError):
            return  # an unreadable config: the trainer's resume says what is wrong
        if changed:
            raise ServiceError(f"job {run_dir.name} cannot resume: " + "; ".join(changed))

    # --- reads ---------------------------------------------------------------------------------
    def status(self, job_id: str) -> JobStatus:
        self.refresh()
        return self._status(self._record(job_id))

    def training_status(self, job_id: str, *, also: tuple[str, ...] = ()) -> JobStatus:
        """The status of a training job (or of a job of a kind in `also`): only training makes a LoRA,
        metrics and checkpoints, and only training and generation make images."""
        status = self.status(job_id)
        if status.kind != "training" and status.kind not in also:
            made = {
                "captioning": "captions",
                "generation": "images",
                "download": "a base model",
                "evaluation": "scores (lora://jobs/<job_id>/evaluation)",
            }[status.kind]
            raise WorkspaceStateError(
                f"job {job_id} is a {status.kind} job: it makes {made}, not a LoRA; get-training-status and "
                "get-training-logs show it"
                + (", get-training-samples its images" if status.kind == "generation" else "")
            )
        return status

    def list(self) -> list[JobStatus]:
        self.refresh()
        return [self._status(record) for record in self.store.all()]

    def logs(self, job_id: str, lines: int) -> str:
        record = self._record(job_id)
        run_dir = Path(record.run_dir)
        text = []
        for name in ("train.log", "process.log"):
            path = run_dir / name
            if path.exists():
                with path.open(encoding="utf-8", errors="replace") as f:
                    text.append(f"== {name} ==\n" + "".join(deque(f, maxlen=lines)))
        return "\n".join(text) if text else f"job {job_id} has written no log yet ({record.state})"

    # --- space ---------------------------------------------------------------------------------
    def delete(self, job_id: str) -> JobDeleted:
        """Delete a finished job: its row and its run directory (checkpoints, samples, the LoRA in it).
        A LoRA exported elsewhere (export-lora, a folder the user chose) is not in the run directory and stays."""
        record = self._finished(job_id, "deleted")
        self._check_not_evaluated(job_id)
        run_dir = Path(record.run_dir)
        owned = self._owns(run_dir)
        freed = cleanup.size_of(run_dir) if owned else 0
        if not self.store.delete(job_id):
            return self.delete(job_id)  # resumed or deleted since it was read: say what it is now
        if owned:
            shutil.rmtree(run_dir, ignore_errors=True)
        return JobDeleted(job_id=job_id, run_dir=record.run_dir, run_dir_removed=owned, freed_bytes=freed)

    def prune(self, request: PruneRequest) -> PruneReport:
        """Free the space of finished jobs (`job_id`, or every finished job): old checkpoints, and with
        `caches` the latent and text caches. A queued or running job is never touched."""
        if request.keep_checkpoints < 1:
            raise ServiceError(
                "keep_checkpoints must be at least 1: the newest checkpoint is what resume-training continues a "
                "stopped job from. To remove a finished job with every checkpoint, use delete-job"
            )
        records = (
            [self._finished(request.job_id, "pruned")]
            if request.job_id
            else [r for r in self.store.all() if r.state in FINAL_STATES]
        )
        runs = []
        for record in records:
            run_dir = Path(record.run_dir)
            if not run_dir.is_dir():
                continue
            removed = cleanup.prunable(run_dir, keep_checkpoints=request.keep_checkpoints, caches=request.caches)
            before = cleanup.size_of(run_dir)
            freed = sum(cleanup.size_of(path) for path in removed)
            if not request.dry_run:
                cleanup.remove(removed)
            runs.append(
                PrunedRun(
                    job_id=record.job_id,
                    bytes_before=before,
                    bytes_after=before - freed,
                    removed=[str(path.relative_to(run_dir)) for path in removed],
                )
            )
        return PruneReport(
            runs=runs,
            bytes_before=sum(run.bytes_before for run in runs),
            bytes_after=sum(run.bytes_after for run in runs),
            dry_run=request.dry_run,
        )

    # --- reconciliation --------------------------------------------------------------------------
    def refresh(self) -> None:
        """Bring running jobs' states up to date with their processes, then start the queued jobs that fit."""
        self.queue.refresh()

    # --- helpers -------------------------------------------------------------------------------
    def _record(self, job_id: str) -> JobRecord:
        checked_name("job", job_id)
        record = self.store.get(job_id)
        if record is None:
            raise WorkspaceStateError(f"no job {job_id!r}; list-training-jobs shows the jobs there are")
        return record

    def _finished(self, job_id: str, done: str) -> JobRecord:
        self.refresh()  # a job whose process has just ended is finished, not running
        record = self._record(job_id)
        if record.state not in FINAL_STATES:
            raise WorkspaceStateError(
                f"job {job_id} is {record.state}; only a finished job (completed, failed, stopped, interrupted) is "
                f"{done}: stop-training it first"
            )
        return record

    def _check_not_evaluated(self, job_id: str) -> None:
        """An evaluate-lora job of this job's LoRA or checkpoints, queued or running, writes its report into this
        job's run folder: deleting the folder under it would lose the report and fail that job."""
        evaluating = [
            r.job_id
            for r in self.store.all()
            if r.kind == "evaluation"
            and r.state not in FINAL_STATES
            and (r.config_name == job_id or r.config_name.startswith(f"{job_id} step "))
        ]
        if evaluating:
            raise WorkspaceStateError(
                f"job {job_id} is being evaluated by {', '.join(evaluating)}, which writes into its run folder: wait "
                "for it to finish (get-training-status) or stop-training it, then delete"
            )

    def _owns(self, run_dir: Path) -> bool:
        """Whether `run_dir` is a job's own folder under the workspace's runs/ (a row from an old table may name
        another folder, which a delete must not remove)."""
        runs = (self.workspace / "runs").resolve()
        return run_dir.resolve().parent == runs and run_dir.is_dir()

    def _status(self, record: JobRecord) -> JobStatus:
        status = read_status(Path(record.run_dir)) if record.state != "queued" or record.resume else {}
        total = status.get("total_steps")
        step = status.get("step") or 0
        done, size = status.get("bytes_done"), status.get("bytes_total")
        percent = 100.0 * (done / size if size else step / total) if size or total else None
        return JobStatus(
            job_id=record.job_id,
            kind=record.kind,
            config_name=record.config_name,
            state=record.state,
            step=step,
            total_steps=total,
            percent=round(percent, 1) if percent is not None else None,
            bytes_done=done,
            bytes_total=size,
            bytes_per_s=status.get("bytes_per_s") if record.state == "running" else None,
            waits_for=record.after_job if record.state == "queued" else None,
            loss=status.get("loss"),
            lr=status.get("lr"),
            grad_norm=status.get("grad_norm"),
            it_per_s=status.get("it_per_s"),
            eta_s=status.get("eta_s") if record.state == "running" else None,
            phase=status.get("phase") if record.state == "running" else None,
            last_checkpoint=status.get("last_checkpoint"),
            latest_samples=status.get("latest_samples") or [],
            lora_path=status.get("lora_path"),
            exported_lora=status.get("exported_lora"),
            error=record.error or status.get("error"),
            warnings=status.get("warnings") or [],
            verdicts=status.get("verdicts") or [],
            devices=record.held_devices(self.queue.machine or [CPU]),
            processes=(status.get("processes") or []) if record.state == "running" else [],
            run_dir=record.run_dir,
            created_at=record.created_at,
            started_at=record.started_at,
            finished_at=record.finished_at,
        )
