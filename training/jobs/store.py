"""The job table: one SQLite file (`state.db` in the workspace), the truth about every job.

Every change is one short transaction; WAL so that readers never wait for a writer, and every writer
takes the write lock at BEGIN (BEGIN IMMEDIATE), so two processes on one workspace (two servers, a
server and a child that just ended) never interleave a read-then-write. The claim of the next job and
the devices it gets are one such transaction: a device is never given to two jobs.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

JobState = Literal["queued", "running", "completed", "failed", "stopped", "interrupted"]
JobKind = Literal["training", "captioning", "generation", "download", "evaluation"]
FINAL_STATES = ("completed", "failed", "stopped", "interrupted")
CPU = "cpu"  # the one device of a machine without GPUs: a job that takes a device takes the machine

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
    error TEXT,
    devices_wanted INTEGER NOT NULL DEFAULT 1,
    devices TEXT,
    after_job TEXT
)
"""
# Columns added since the first table, with what the rows of an older table get: every such row is a
# training job; its pids are checked without a create time; a job took the GPU (captioning ran in a
# slot of its own, so it takes none); and none holds a recorded device (a running one, from before
# allocations were recorded, holds the whole machine until it ends: see `JobRecord.held_devices`); and
# none waits for another job.
_MIGRATIONS = {
    "kind": ("TEXT NOT NULL DEFAULT 'training'", None),
    "pid_created_at": ("REAL", None),
    "devices_wanted": ("INTEGER NOT NULL DEFAULT 1", "UPDATE jobs SET devices_wanted = 0 WHERE kind = 'captioning'"),
    "devices": ("TEXT", None),
    "after_job": ("TEXT", None),
}


class QueueError(ValueError):
    """A job the queue cannot take as asked; the message says why and what to do (for the assistant)."""


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
    devices_wanted: int = 1  # devices the job needs to start (0: it starts at once, beside anything)
    devices: str | None = None  # while running: the ids it holds, comma-separated ('' none); None: none recorded
    after_job: str | None = None  # a job that must complete first (the download of the model a training uses)

    @property
    def device_ids(self) -> list[str]:
        return [device for device in (self.devices or "").split(",") if device]

    def held_devices(self, devices: list[str]) -> list[str]:
        """Which of `devices` (the machine's, or [CPU]) the job holds: none unless it runs. A running job
        with no recorded allocation (started by a version that did not record one) that takes devices
        holds them all until it ends: which one it uses is not known."""
        if self.state != "running":
            return []
        if self.devices is None and self.devices_wanted > 0:
            return list(devices)
        return self.device_ids


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
            for column, (declaration, fill) in _MIGRATIONS.items():
                if column not in columns:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {declaration}")
                    if fill:
                        db.execute(fill)

    @contextmanager
    def transaction(self, *, write: bool = True):
        """One transaction on a fresh connection (tools run in several threads). A writer takes
        the write lock at BEGIN, so two processes never interleave a read-then-write."""
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
        with self.transaction() as db:
            _insert(db, record)

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
        with self.transaction() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE kind = ? AND config_name = ? AND state IN ('queued', 'running') "
                "ORDER BY created_at, job_id LIMIT 1",
                (record.kind, record.config_name),
            ).fetchone()
            if row is not None:
                return JobRecord(**dict(row))
            _insert(db, record)
        return None

    def update(self, job_id: str, *, only_if: dict | None = None, **fields) -> bool:
        """Set `fields`; with `only_if` ({column: value}), only while the row still has those values,
        so a change decided on an older read cannot overwrite a newer one. Whether the row changed.
        A job that reaches a final state gives its devices back in the same change."""
        if fields.get("state") in FINAL_STATES:
            fields["devices"] = None
        expected = only_if or {}
        condition = "".join(f" AND {key} IS ?" for key in expected)
        with self.transaction() as db:
            cursor = db.execute(
                f"UPDATE jobs SET {', '.join(f'{key} = ?' for key in fields)} WHERE job_id = ?{condition}",
                [*fields.values(), job_id, *expected.values()],
            )
            return cursor.rowcount > 0

    def delete(self, job_id: str) -> bool:
        """Remove a finished job's row; False when it is not there or not finished (any more)."""
        marks = ", ".join("?" for _ in FINAL_STATES)
        with self.transaction() as db:
            cursor = db.execute(f"DELETE FROM jobs WHERE job_id = ? AND state IN ({marks})", (job_id, *FINAL_STATES))
            return cursor.rowcount > 0

    def claim_next(self, machine: list[str]) -> JobRecord | None:
        """Mark the next queued job that can start running, with the devices it gets: one transaction.

        `machine`: the device ids of this machine (GPUs), or [] for none, where the machine is one device
        (CPU) that a job taking any device takes whole. Jobs start oldest first. A job that takes no device
        starts at once. One that takes devices starts when that many are free; while it waits, later jobs
        that take devices wait behind it, even ones that would fit: a 2-GPU job is never starved by a stream
        of 1-GPU jobs, each of which would otherwise keep one of its two devices busy. A job that asks for
        more devices than the machine has can never start: it fails with the reason, so it holds no one up.
        A job waiting for another (`after_job`) is passed over, holding no one up, until that one completes;
        when that one ends otherwise, it fails with that job's error.
        """
        devices = machine or [CPU]
        with self.transaction() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE state IN ('queued', 'running') ORDER BY created_at, job_id"
            ).fetchall()
            free = [device for device in devices if device not in _held(rows, devices)]
            waiting = False
            active = {row["job_id"] for row in rows}
            for row in (row for row in rows if row["state"] == "queued"):
                if row["after_job"] in active:
                    continue
                if row["after_job"] and (refusal := _after_failed(db, row["after_job"])):
                    _fail(db, row["job_id"], refusal)
                    continue
                wanted = min(row["devices_wanted"], 1) if not machine else row["devices_wanted"]
                if machine and wanted > len(machine):
                    _fail(db, row["job_id"], too_many_devices(wanted, machine))
                    continue
                if wanted == 0 or (not waiting and wanted <= len(free)):
                    return _start(db, row, free[:wanted])
                waiting = True
        return None


def too_many_devices(wanted: int, machine: list[str]) -> str:
    return (
        f"the job asks for {wanted} GPUs (num_processes) but this machine has {len(machine)} "
        f"({', '.join(machine)}; LORA_MCP_GPUS or CUDA_VISIBLE_DEVICES choose them): set num_processes to at "
        f"most {len(machine)} with update-training-config"
    )


def _after_failed(db: sqlite3.Connection, job_id: str) -> str | None:
    """Why a job waiting for `job_id` cannot start: that job ended without completing (a deleted one is
    taken as done: what it made, if anything, is checked by the waiting job itself)."""
    row = db.execute("SELECT state, error FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    if row is None or row["state"] == "completed":
        return None
    return (
        f"job {job_id}, which this one waits for, ended {row['state']}: {row['error'] or 'no error recorded'}. "
        f"resume-training {job_id}, then resume-training this job"
    )


def _fail(db: sqlite3.Connection, job_id: str, error: str) -> None:
    db.execute(
        "UPDATE jobs SET state = 'failed', finished_at = ?, error = ? WHERE job_id = ?", (time.time(), error, job_id)
    )


def _held(rows: list[sqlite3.Row], devices: list[str]) -> set[str]:
    """The devices running jobs hold (`JobRecord.held_devices`)."""
    return {device for row in rows for device in JobRecord(**dict(row)).held_devices(devices)}


def _start(db: sqlite3.Connection, row: sqlite3.Row, devices: list[str]) -> JobRecord:
    now, allocation = time.time(), ",".join(devices)
    db.execute(
        "UPDATE jobs SET state = 'running', pid = NULL, pid_created_at = NULL, started_at = ?, finished_at = NULL, "
        "error = NULL, stop_requested_at = NULL, devices = ? WHERE job_id = ?",
        (now, allocation, row["job_id"]),
    )
    fields = {"state": "running", "started_at": now, "pid": None, "pid_created_at": None, "error": None}
    return JobRecord(**{**dict(row), **fields, "finished_at": None, "stop_requested_at": None, "devices": allocation})


def _insert(db: sqlite3.Connection, record: JobRecord) -> None:
    fields = record.model_dump()
    columns, marks = ", ".join(fields), ", ".join("?" for _ in fields)
    db.execute(f"INSERT INTO jobs ({columns}) VALUES ({marks})", list(fields.values()))
