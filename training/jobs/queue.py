"""The queue: which queued job starts, on which devices, as which child process; and what a running
job's row says once its process has ended.

Each child runs detached in its own process group (`training.processes`, the same on Linux, macOS and
Windows), with no stdin and its output in `process.log`, so it survives whoever started it. The queue
needs no server: a child that ends marks its own row final, from the status.json it wrote, and starts
the next job that fits (`finish_and_start_next`), so jobs queued for the night all run after every
server has exited. Whoever notices first (that child, a server's refresh) does it, exactly once: a final
state is written only while the row is still that run, and a claim is one transaction.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from training import processes
from training.jobs.devices import child_environment, machine_devices
from training.jobs.store import JobRecord, JobStore
from training.run_files import RunFiles

log = logging.getLogger("training.jobs")

# The child's module, by kind: how it is started, and how a pid is recognised as still being it.
CHILD_MODULES: dict[str, str] = {
    "training": "training.cli",
    "captioning": "training.captioning",
    "generation": "training.generation",
    "download": "training.downloads",
    "evaluation": "training.evaluation.run",
}
RESUME_FROM = {  # what resume-training does for an interrupted job of each kind
    "training": "continues from its last checkpoint",
    "captioning": "continues with the images not yet captioned",
    "generation": "renders the images again",
    "download": "continues each file where it stopped",
    "evaluation": "renders and scores every image again",
}
STARTUP_GRACE_S = 120.0  # a job marked running may take this long to show its pid (the spawn follows the commit)
STOP_TIMEOUT_S = 60.0  # after a stop request the trainer finishes its step and saves; then it is killed
HEARTBEAT_STALE_S = 60.0  # the trainer's status heartbeat comes every 2 s; a minute of silence means it is gone
JOB_ID_VARIABLE = "LORA_MCP_JOB_ID"  # tells a child which row is its own
WORKSPACE_VARIABLE = "LORA_MCP_HOME"


class JobQueue:
    def __init__(self, workspace: Path, *, python: str = sys.executable, stop_timeout: float = STOP_TIMEOUT_S):
        self.workspace = workspace
        self.store = JobStore(workspace / "state.db")
        self.machine = machine_devices()
        self._python = python
        self._stop_timeout = stop_timeout
        self._children: dict[int, subprocess.Popen] = {}  # only to reap our own children; the table is the truth

    def refresh(self) -> None:
        """Bring running jobs' states up to date with their processes, then start the queued jobs that fit."""
        for pid, child in list(self._children.items()):
            if child.poll() is not None:  # reaped: a child that marked its own row final leaves no zombie
                self._children.pop(pid, None)
        records = self.store.all()
        for record in records:
            if record.state == "running":
                self.reconcile(record)
        # A claim is a write transaction (1.3 ms of a 2.2 ms status call): only when a job waits. One
        # queued after this read is claimed by the refresh of the call that queued it.
        if any(record.state == "queued" for record in records):
            self.start_queued()

    def start_queued(self) -> None:
        while (claimed := self.store.claim_next(self.machine)) is not None:
            self._spawn(claimed)

    def reconcile(self, record: JobRecord, *, ended: bool = False) -> None:
        """Write the final state of a running job whose process has ended (`ended`: the caller is that
        process, at its end). Several processes reconcile at once, each from its own read of the row: a
        final state is written only while the row is still that run (running, same start time), so a
        reconcile from an older read never ends a job that was resumed and started again since."""
        this_run = {"state": "running", "started_at": record.started_at}
        if not ended and record.pid is None and time.time() - (record.started_at or 0) < STARTUP_GRACE_S:
            return  # being spawned right now (by this or another process): whatever status.json says is older
        status = this_runs_status(record)
        alive = not ended and self._alive(record, status)
        final = status.get("state") if status.get("state") in ("completed", "failed", "stopped") else None
        if final and not alive:
            self.store.update(
                record.job_id, only_if=this_run, state=final, finished_at=time.time(), error=status.get("error")
            )
        elif alive:
            if record.stop_requested_at and time.time() - record.stop_requested_at > self._stop_timeout:
                processes.kill_tree(record.pid)
        elif record.stop_requested_at:
            self.store.update(record.job_id, only_if=this_run, state="stopped", finished_at=time.time())
        else:
            reason = status.get("error") or last_line(Path(record.run_dir) / "process.log")
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
        files = RunFiles(run_dir)
        if record.kind != "training":
            args = [str(run_dir)]  # captioning and downloads continue where they stopped
        elif record.resume and files.config.is_file():
            args = ["--resume", str(run_dir), "--quiet"]
        else:
            # New, or resumed before the trainer wrote its config.yaml (it waited for a download that failed,
            # or its setup failed): nothing to continue, so it starts afresh from its request. The status.json
            # of such a setup is dropped, else the trainer would take the folder for a run it must not overwrite.
            files.status.unlink(missing_ok=True)
            args = [str(run_dir / "request.yaml"), "--run-dir", str(run_dir), "--quiet"]
        environment = {
            **os.environ,
            WORKSPACE_VARIABLE: str(self.workspace),
            JOB_ID_VARIABLE: record.job_id,
            **child_environment(record.device_ids, self.machine),
        }
        try:
            with open(run_dir / "process.log", "ab") as output:
                process = subprocess.Popen(
                    [self._python, "-m", CHILD_MODULES[record.kind], *args],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    cwd=self.workspace,
                    env=environment,
                    **processes.detached_options(),
                )
        except OSError as exc:
            self.store.update(record.job_id, state="failed", finished_at=time.time(), error=f"could not start: {exc}")
            return False
        self._children[process.pid] = process
        # Only while the row is still this run: a child that ended at once may have marked it final already.
        self.store.update(
            record.job_id,
            only_if={"state": "running", "started_at": record.started_at},
            pid=process.pid,
            pid_created_at=processes.create_time(process.pid),
        )
        return True

    def _alive(self, record: JobRecord, status: dict) -> bool:
        """Our own child: its exit status says. Another process's child (or a previous server's):
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


def exit_as_job(main: Callable[[], int]) -> NoReturn:
    """Exit with `main()`'s code, running `finish_and_start_next` first, even when `main` raises. The
    traceback (or a sys.exit message) is printed, and the output flushed, before: an interrupted job's
    error is process.log's last line, which must be the crash and not what came before it."""
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
        if isinstance(code, str):  # sys.exit("message"): Python would print it only as the process exits
            print(code, file=sys.stderr)
            code = 1
    except BaseException:  # KeyboardInterrupt too: the job's row must still be written
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    finish_and_start_next()
    sys.exit(code)


def finish_and_start_next() -> None:
    """Called by a job's child as it ends (the `__main__` of training.cli, training.captioning,
    training.generation, training.downloads): mark its row final from the status.json it wrote, exactly as a server's
    reconcile would, then start the queued jobs that now fit. Nothing for a process the queue did not
    start (a user's own `lora-train`: no LORA_MCP_JOB_ID), nor for a data-parallel worker (LOCAL_RANK set:
    its launcher, the job's own process, does it once for the job)."""
    job_id, workspace = os.environ.get(JOB_ID_VARIABLE), os.environ.get(WORKSPACE_VARIABLE)
    if not job_id or not workspace or "LOCAL_RANK" in os.environ:
        return
    try:
        queue = JobQueue(Path(workspace))
        record = queue.store.get(job_id)
        if record is not None and record.state == "running" and record.pid in (None, os.getpid()):
            queue.reconcile(record, ended=True)
        queue.refresh()
    except Exception:  # the job's own outcome is written; a server's refresh starts the next one instead
        log.exception("could not start the next queued job")


def this_runs_status(record: JobRecord) -> dict:
    """The job's status.json if this run of it wrote it, else {}. A resumed job's run directory holds
    the previous run's file (its final state, an old heartbeat) until the new child writes its first one,
    which takes seconds (a data-parallel job: after its workers have loaded the model); believing it would
    end the job, and free its devices, while it starts. A file without timestamps (an old version's) is
    taken as it is."""
    status = read_status(Path(record.run_dir))
    written = status.get("updated_at") or status.get("heartbeat") or status.get("started_at")
    if record.started_at is not None and isinstance(written, int | float) and written < record.started_at:
        return {}
    return status


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def last_line(path: Path) -> str | None:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in deque(f, maxlen=20) if line.strip()]
    except OSError:
        return None
    return lines[-1][:300] if lines else None
