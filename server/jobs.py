"""Background jobs: a durable queue in SQLite, each job a child process.

Three kinds of job share the table: `training` (a `lora-train` process), `captioning` (a
`python -m training.captioning` process, for generate-captions on a long set) and `generation`
(`python -m training.generation`, for generate-image with a real model). The job table
(`state.db`) is the truth; nothing about a job lives only in memory. A job's progress is read
from its run directory (status.json, train.log), which the child writes atomically. Training and
generation share the GPU and run one at a time; a captioning job runs beside them (a dataset can be
captioned while another trains). Later jobs wait as `queued` and start in order.

Each child runs detached in its own process group (`server.processes`, the same on Linux, macOS
and Windows), with no stdin and its output in `process.log`, so it survives the server and a crash
of either cannot take down the other. A stop writes the run directory's `stop-request` file (and
signals the child where signals exist); the child finishes its step, saves and ends `stopped`.
`refresh()` reconciles the table with the processes: it is called on start-up, by every read,
and by the server's monitor loop.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import deque
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from training import processes
from server.errors import WorkspaceStateError
from server.names import checked_name
from training.run_files import RunFiles
from training.workspace import atomic_write_text

JobState = Literal["queued", "running", "completed", "failed", "stopped", "interrupted"]
JobKind = Literal["training", "captioning", "generation"]
# The child's module, by kind: how it is started, and how a pid is recognised as still being it.
CHILD_MODULES: dict[str, str] = {
    "training": "training.cli",
    "captioning": "training.captioning",
    "generation": "training.generation",
}
# Kinds that share a slot run one at a time: training and generation both want the GPU (an SDXL
# pipeline in fp32 alone is ~14 GB), while captioning models are small and run beside training.
SLOTS = {"training": "gpu", "generation": "gpu", "captioning": "captioning"}
RESUME_FROM = {  # what resume-training does for an interrupted job of each kind
    "training": "continues from its last checkpoint",
    "captioning": "continues with the images not yet captioned",
    "generation": "renders the images again",
}
FINAL_STATES = ("completed", "failed", "stopped", "interrupted")
RESUMABLE_STATES = ("stopped", "interrupted", "failed")
STARTUP_GRACE_S = 120.0  # a job marked running may take this long to show its pid (the spawn follows the commit)
STOP_TIMEOUT_S = 60.0  # after a stop request the trainer finishes its step and saves; then it is killed
HEARTBEAT_STALE_S = 60.0  # the trainer's status heartbeat comes every 2 s; a minute of silence means it is gone

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL DEFAULT 'training',
    config_name TEXT NOT NULL,
    state TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    pid INTEGER,
    pid_created_at REAL,
    resume INTEGER NOT NULL DEFAULT 0,
    stop_requested_at REAL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT
)
"""

log = logging.getLogger("server")


class JobRecord(BaseModel):
    job_id: str
    kind: JobKind = "training"
    config_name: str  # the config trained, or the dataset captioned
    state: JobState
    run_dir: str
    pid: int | None = None
    pid_created_at: float | None = None  # the child's start time: with the pid, which process it is
    resume: bool = False
    stop_requested_at: float | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None


class JobStatus(BaseModel):
    job_id: str
    kind: JobKind = Field(
        "training",
        description="training (start-training), captioning (generate-captions on a long set) or generation "
        "(generate-image / compare-lora-strengths with a real model)",
    )
    config_name: str = Field(description="The config trained; for a captioning job, the dataset.")
    state: JobState = Field(description="queued, running, completed, failed, stopped or interrupted")
    step: int = Field(0, description="Optimizer steps done; for a captioning job, images captioned.")
    total_steps: int | None = None
    percent: float | None = Field(None, description="step / total_steps x 100")
    loss: float | None = Field(None, description="smoothed training loss")
    lr: float | None = None
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
    error: str | None = None
    run_dir: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None


class JobStore:
    """The job table. One short transaction per change; WAL so readers never wait for a writer."""

    def __init__(self, path: Path):
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path) as db:  # WAL is a property of the file: set once
            db.execute("PRAGMA journal_mode=WAL")
        with self.transaction() as db:
            db.execute(_SCHEMA)
            columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            if "kind" not in columns:  # a table from before captioning jobs: every row is a training job
                db.execute("ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'training'")
            if "pid_created_at" not in columns:  # a table from before create times: its pids are checked without
                db.execute("ALTER TABLE jobs ADD COLUMN pid_created_at REAL")

    @contextmanager
    def transaction(self, *, write: bool = True):
        """One transaction on a fresh connection (tools run in several threads). A writer takes
        the write lock at BEGIN, so two servers never interleave a read-then-write."""
        db = sqlite3.connect(self._path, timeout=10.0, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=10000")
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def insert(self, record: JobRecord) -> None:
        fields = record.model_dump()
        with self.transaction() as db:
            columns, marks = ", ".join(fields), ", ".join("?" for _ in fields)
            db.execute(f"INSERT INTO jobs ({columns}) VALUES ({marks})", list(fields.values()))

    def get(self, job_id: str) -> JobRecord | None:
        with self.transaction(write=False) as db:
            row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return JobRecord(**dict(row)) if row else None

    def all(self) -> list[JobRecord]:
        with self.transaction(write=False) as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created_at, job_id").fetchall()
        return [JobRecord(**dict(row)) for row in rows]

    def insert_unless_active(self, record: JobRecord) -> JobRecord | None:
        """Insert `record` unless a queued or running job of its kind has its subject (config or
        dataset): then that job is returned and nothing is inserted. The check and the insert are one
        transaction, so two calls (or two servers) starting one config never both insert."""
        fields = record.model_dump()
        with self.transaction() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE kind = ? AND config_name = ? AND state IN ('queued', 'running') "
                "ORDER BY created_at, job_id LIMIT 1",
                (record.kind, record.config_name),
            ).fetchone()
            if row is not None:
                return JobRecord(**dict(row))
            columns, marks = ", ".join(fields), ", ".join("?" for _ in fields)
            db.execute(f"INSERT INTO jobs ({columns}) VALUES ({marks})", list(fields.values()))
        return None

    def update(self, job_id: str, *, only_if: dict | None = None, **fields) -> bool:
        """Set `fields`; with `only_if` ({column: value}), only while the row still has those values,
        so a change decided on an older read cannot overwrite a newer one. Whether the row changed."""
        expected = only_if or {}
        condition = "".join(f" AND {key} IS ?" for key in expected)
        with self.transaction() as db:
            cursor = db.execute(
                f"UPDATE jobs SET {', '.join(f'{key} = ?' for key in fields)} WHERE job_id = ?{condition}",
                [*fields.values(), job_id, *expected.values()],
            )
            return cursor.rowcount > 0

    def claim_next(self, kind: str) -> JobRecord | None:
        """Mark the oldest queued job of `kind` running, if no job of its slot (SLOTS) is running: one
        transaction, so two servers on one workspace never start two jobs."""
        sharing = [other for other, slot in SLOTS.items() if slot == SLOTS[kind]]
        marks = ", ".join("?" for _ in sharing)
        with self.transaction() as db:
            if db.execute(f"SELECT 1 FROM jobs WHERE state = 'running' AND kind IN ({marks})", sharing).fetchone():
                return None
            row = db.execute(
                "SELECT * FROM jobs WHERE state = 'queued' AND kind = ? ORDER BY created_at, job_id LIMIT 1", (kind,)
            ).fetchone()
            if row is None:
                return None
            now = time.time()
            db.execute(
                "UPDATE jobs SET state = 'running', pid = NULL, pid_created_at = NULL, started_at = ?, "
                "finished_at = NULL, error = NULL, stop_requested_at = NULL WHERE job_id = ?",
                (now, row["job_id"]),
            )
        return JobRecord(
            **{**dict(row), "state": "running", "started_at": now, "pid": None, "pid_created_at": None, "error": None}
        )


class JobService:
    def __init__(self, workspace: Path, *, python: str = sys.executable, stop_timeout: float = STOP_TIMEOUT_S):
        self.workspace = workspace
        self.store = JobStore(workspace / "state.db")
        self._python = python
        self._stop_timeout = stop_timeout
        self._children: dict[int, subprocess.Popen] = {}  # only to reap our own children; the table is the truth

    # --- commands ------------------------------------------------------------------------------
    def start(self, config_name: str, config_yaml: str) -> JobRecord:
        """Queue a training job for a config's YAML, as given (it is copied, so later edits do not change it).
        Front ends start saved configs through `TrainingService.start`, which validates them first."""
        checked_name("config", config_name)
        return self._queue("training", config_name, config_name, "request.yaml", config_yaml)

    def start_captioning(self, dataset_label: str, request_json: str) -> JobRecord:
        """Queue a captioning job: `request_json` is a training.captioning.CaptionJob."""
        checked_name("dataset", dataset_label)
        return self._queue("captioning", dataset_label, f"captions-{dataset_label}", "request.json", request_json)

    def start_generation(self, label: str, request_json: str) -> JobRecord:
        """Queue an image generation job: `request_json` is a training.generation.GenerationRequest."""
        checked_name("job", label)
        return self._queue("generation", label, f"images-{label}", "request.json", request_json)

    def _queue(self, kind: JobKind, subject: str, prefix: str, request_name: str, request: str) -> JobRecord:
        job_id = f"{prefix}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
        run_dir = self.workspace / "runs" / job_id
        run_dir.mkdir(parents=True)
        atomic_write_text(run_dir / request_name, request)  # before the row: a job claimed at once finds it
        record = JobRecord(
            job_id=job_id, kind=kind, config_name=subject, state="queued", run_dir=str(run_dir), created_at=time.time()
        )
        active = self.store.insert_unless_active(record)
        if active is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
            what = "config" if kind == "training" else "dataset"
            raise WorkspaceStateError(
                f"{what} {subject!r} already has {kind} job {active.job_id} ({active.state}); watch it with "
                "get-training-status, or stop-training it first"
            )
        self.refresh()
        return self._record(job_id)

    def stop(self, job_id: str) -> JobRecord:
        record = self._record(job_id)
        if record.state == "queued":
            if not self.store.update(job_id, only_if={"state": "queued"}, state="stopped", finished_at=time.time()):
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
        record = self._record(job_id)
        if record.state not in RESUMABLE_STATES:
            raise WorkspaceStateError(
                f"job {job_id} is {record.state}; only a stopped, interrupted or failed job can be resumed"
            )
        RunFiles(Path(record.run_dir)).clear_stop_request()  # left by a stop the child never read
        fields = {"state": "queued", "resume": 1, "error": None, "finished_at": None, "stop_requested_at": None}
        if not self.store.update(job_id, only_if={"state": record.state}, **fields):
            return self.resume(job_id)  # resumed by another call meanwhile: say what it is now
        self.refresh()
        return self._record(job_id)

    # --- reads ---------------------------------------------------------------------------------
    def status(self, job_id: str) -> JobStatus:
        self.refresh()
        return self._status(self._record(job_id))

    def training_status(self, job_id: str, *, also: tuple[str, ...] = ()) -> JobStatus:
        """The status of a training job (or of a job of a kind in `also`): only training makes a LoRA,
        metrics and checkpoints, and only training and generation make images."""
        status = self.status(job_id)
        if status.kind != "training" and status.kind not in also:
            made = {"captioning": "captions", "generation": "images"}[status.kind]
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

    # --- reconciliation --------------------------------------------------------------------------
    def refresh(self) -> None:
        """Bring running jobs' states up to date with their processes, then start the next
        queued job if none is running."""
        records = self.store.all()
        for record in records:
            if record.state == "running":
                self._reconcile(record)
        # Claiming is a write transaction per kind (1.3 ms of a 2.2 ms status call): only when a job waits. One
        # queued after this read is claimed by the refresh of the call that queued it.
        queued = {record.kind for record in records if record.state == "queued"}
        for kind in CHILD_MODULES:
            while kind in queued and (claimed := self.store.claim_next(kind)) is not None:
                if self._spawn(claimed):
                    break

    def _reconcile(self, record: JobRecord) -> None:
        # Several calls (threads, servers) reconcile at once, each from its own read of the row: a
        # final state is written only while the row is still that run (running, same start time), so
        # a reconcile from an older read never ends a job that was resumed and started again since.
        this_run = {"state": "running", "started_at": record.started_at}
        status = read_status(Path(record.run_dir))
        alive = self._alive(record, status)
        final = status.get("state") if status.get("state") in ("completed", "failed", "stopped") else None
        if final and not alive:
            self.store.update(
                record.job_id, only_if=this_run, state=final, finished_at=time.time(), error=status.get("error")
            )
        elif alive:
            if record.stop_requested_at and time.time() - record.stop_requested_at > self._stop_timeout:
                processes.kill_tree(record.pid)
        elif record.pid is None and time.time() - (record.started_at or 0) < STARTUP_GRACE_S:
            pass  # being spawned right now (by this or another server)
        elif record.stop_requested_at:
            self.store.update(record.job_id, only_if=this_run, state="stopped", finished_at=time.time())
        else:
            reason = status.get("error") or _last_line(Path(record.run_dir) / "process.log")
            self.store.update(
                record.job_id,
                only_if=this_run,
                state="interrupted",
                finished_at=time.time(),
                error=f"the {record.kind} process ended without a final state ({reason or 'no output'}); "
                f"resume-training {RESUME_FROM[record.kind]}",
            )

    def _spawn(self, record: JobRecord) -> bool:
        run_dir = Path(record.run_dir)
        if record.kind != "training":
            args = [str(run_dir)]  # captioning continues with the images not yet captioned
        elif record.resume:
            args = ["--resume", str(run_dir), "--quiet"]
        else:
            args = [str(run_dir / "request.yaml"), "--run-dir", str(run_dir), "--quiet"]
        try:
            with open(run_dir / "process.log", "ab") as log:
                process = subprocess.Popen(
                    [self._python, "-m", CHILD_MODULES[record.kind], *args],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workspace,
                    env={**os.environ, "LORA_MCP_HOME": str(self.workspace)},
                    **processes.detached_options(),
                )
        except OSError as exc:
            self.store.update(record.job_id, state="failed", finished_at=time.time(), error=f"could not start: {exc}")
            return False
        self._children[process.pid] = process
        self.store.update(record.job_id, pid=process.pid, pid_created_at=processes.create_time(process.pid))
        return True

    def _alive(self, record: JobRecord, status: dict) -> bool:
        """Our own child: its exit status says. Another server's (or a previous server's) child:
        the pid must exist, still run the job's module and have started when the child did (pids are
        reused, e.g. after a reboot), and its heartbeat must be recent."""
        pid = record.pid
        if pid is None:
            return False
        child = self._children.get(pid)
        if child is not None:
            if child.poll() is None:
                return True
            self._children.pop(pid, None)  # reaped (another thread's refresh may have been first)
            return False
        if not processes.runs_module(pid, CHILD_MODULES[record.kind], record.pid_created_at):
            return False
        heartbeat = status.get("heartbeat")
        return heartbeat is None or time.time() - heartbeat < HEARTBEAT_STALE_S

    # --- helpers -------------------------------------------------------------------------------
    def _record(self, job_id: str) -> JobRecord:
        checked_name("job", job_id)
        record = self.store.get(job_id)
        if record is None:
            raise WorkspaceStateError(f"no job {job_id!r}; list-training-jobs shows the jobs there are")
        return record

    def _status(self, record: JobRecord) -> JobStatus:
        status = read_status(Path(record.run_dir)) if record.state != "queued" or record.resume else {}
        total = status.get("total_steps")
        step = status.get("step") or 0
        return JobStatus(
            job_id=record.job_id,
            kind=record.kind,
            config_name=record.config_name,
            state=record.state,
            step=step,
            total_steps=total,
            percent=round(100.0 * step / total, 1) if total else None,
            loss=status.get("loss"),
            lr=status.get("lr"),
            it_per_s=status.get("it_per_s"),
            eta_s=status.get("eta_s") if record.state == "running" else None,
            phase=status.get("phase") if record.state == "running" else None,
            last_checkpoint=status.get("last_checkpoint"),
            latest_samples=status.get("latest_samples") or [],
            lora_path=status.get("lora_path"),
            error=record.error or status.get("error"),
            run_dir=record.run_dir,
            created_at=record.created_at,
            started_at=record.started_at,
            finished_at=record.finished_at,
        )


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _last_line(path: Path) -> str | None:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in deque(f, maxlen=20) if line.strip()]
    except OSError:
        return None
    return lines[-1][:300] if lines else None
