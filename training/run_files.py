"""The run directory: the contract between a training process and whoever watches it.

See training/README.md for the layout. Every file is either replaced atomically (status,
config, checkpoints, LoRA, sample images) or appended one whole line per write (jsonl).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from training.workspace import append_line, atomic_write_json, atomic_write_text, runs_dir

RunState = Literal["running", "completed", "failed", "stopped"]
HEARTBEAT_SECONDS = 2.0  # status.json is rewritten at least this often while the process lives
STATUS_WARNINGS = 5  # the latest warnings status.json keeps: train.log and metrics.jsonl hold them all
# EMA weight of the loss and step time shown in status.json; the server's loss curve smooths metrics.jsonl's
# losses with the same function, so its bold line ends at the status's loss.
LOSS_SMOOTHING = 0.9
_CHECKPOINT_DIR = re.compile(r"^step(\d{6,})$")


class RunAlreadyExists(RuntimeError):
    pass


def default_run_dir(name: str) -> Path:
    return runs_dir() / f"{name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


class RunFiles:
    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.config = run_dir / "config.yaml"
        self.status = run_dir / "status.json"
        self.metrics = run_dir / "metrics.jsonl"
        self.log = run_dir / "train.log"
        self.samples = run_dir / "samples"
        self.samples_index = self.samples / "index.jsonl"
        self.checkpoints = run_dir / "checkpoints"
        self.latent_cache = run_dir / "latent_cache"
        self.text_cache = run_dir / "text_cache"
        self.tensorboard = run_dir / "tensorboard"  # with log_with tensorboard; W&B writes its wandb/ beside it
        self.stop_request = run_dir / "stop-request"

    # A stop that works on every platform: whoever wants the run to stop writes this file, and the
    # process checks it after every step (one stat). Signals (SIGINT/SIGTERM) are the fast path where
    # they exist; a Windows child started detached gets none.
    def request_stop(self) -> None:
        atomic_write_text(self.stop_request, f"{time.time()}\n")

    def stop_requested(self) -> bool:
        return self.stop_request.exists()

    def clear_stop_request(self) -> None:
        """Forget a stop request: the run it stopped has ended (or is resumed)."""
        with contextlib.suppress(OSError):  # e.g. Windows, while a scanner holds it: a resume clears it again
            self.stop_request.unlink(missing_ok=True)

    def create(self) -> None:
        for folder in (self.dir, self.samples, self.checkpoints):
            folder.mkdir(parents=True, exist_ok=True)

    def remove_partial_writes(self) -> list[Path]:
        """Delete what a killed process left half-written: hidden temporary files and staging
        folders (every write goes through one, so nothing else can be partial)."""
        removed = []
        for folder in (self.dir, self.samples, self.checkpoints, self.latent_cache, self.text_cache):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.name.startswith(".") and (entry.name.endswith(".tmp") or folder == self.checkpoints):
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                    removed.append(entry)
        return removed

    def check_new(self, resume: bool) -> None:
        """A new run must not write into a directory where one has started."""
        if not resume and (self.status.exists() or self.list_checkpoints()):
            raise RunAlreadyExists(
                f"{self.dir} already holds a run: continue it with --resume, or choose another --run-dir"
            )

    def lora(self, name: str) -> Path:
        return self.dir / f"{name}.safetensors"

    def sample_image(self, step: int, prompt_index: int) -> Path:
        return self.samples / f"step{step:06d}_p{prompt_index}.png"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step{step:06d}"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first (a half-written one is a dot-folder and not listed)."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for folder in self.checkpoints.iterdir():
            match = _CHECKPOINT_DIR.match(folder.name)
            if match and folder.is_dir():
                found.append((int(match.group(1)), folder))
        return sorted(found)

    def prune_checkpoints(self, keep_last: int, *, also_keep: int | None = None) -> None:
        """Delete all but the newest `keep_last` checkpoints (0 keeps all), and never the one of step
        `also_keep` (the recommended checkpoint)."""
        if keep_last <= 0:
            return
        for step, folder in self.list_checkpoints()[:-keep_last]:
            if step != also_keep:
                shutil.rmtree(folder, ignore_errors=True)

    def append_metric(self, row: dict[str, Any]) -> None:
        append_line(self.metrics, json.dumps(row, sort_keys=True))

    def append_sample(self, row: dict[str, Any]) -> None:
        append_line(self.samples_index, json.dumps(row, sort_keys=True))


def smoothed(average: float | None, value: float) -> float:
    """The exponential moving average shown in status.json (weight LOSS_SMOOTHING), or `value` at first."""
    return value if average is None else LOSS_SMOOTHING * average + (1 - LOSS_SMOOTHING) * value


def smoothed_series(values: list[float | None]) -> list[float | None]:
    """`smoothed` along `values`: at each one the average so far (a None, a step with no finite loss, is
    skipped and keeps the average); None before the first value."""
    averages: list[float | None] = []
    average = None
    for value in values:
        average = average if value is None else smoothed(average, value)
        averages.append(average)
    return averages


class StatusWriter:
    """Keeps `status.json` current: fields are merged in by `update()`, and a background thread
    rewrites the file with a fresh heartbeat every HEARTBEAT_SECONDS, so a watcher can tell a
    busy process (caching latents, rendering samples) from a dead one."""

    def __init__(self, path: Path, total_steps: int | None = None):
        self._path = path
        self._lock = threading.Lock()
        now = time.time()
        self._fields: dict[str, Any] = {
            "state": "running",
            "step": 0,
            "total_steps": total_steps,
            "epoch": 0,
            "loss": None,
            "lr": None,
            "grad_norm": None,
            "it_per_s": None,
            "eta_s": None,
            "last_checkpoint": None,
            "lora_path": None,
            "error": None,
            # what the process is doing: "setting up", "caching latents 640/2000", "caching text
            # 300/2000", "training"
            "phase": "setting up",
            "pid": os.getpid(),
            "started_at": now,
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="status-heartbeat", daemon=True)

    def start(self) -> None:
        self.write()
        self._thread.start()

    def update(self, **fields: Any) -> None:
        with self._lock:
            self._fields.update(fields)

    def warn(self, message: str) -> None:
        """A problem the run met and went on from (a round of samples abandoned), for whoever watches the status."""
        with self._lock:
            self._fields["warnings"] = [*self._fields.get("warnings", []), message][-STATUS_WARNINGS:]

    def finish(self, state: RunState, **fields: Any) -> None:
        """Write the final state and stop the heartbeat."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.update(state=state, **fields)
        self.write()

    def write(self) -> None:
        with self._lock:
            now = time.time()
            self._fields.update(heartbeat=now, updated_at=now)
            atomic_write_json(self._path, self._fields)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self.write()


def end_status(path: Path, state: RunState, **fields: Any) -> None:
    """Mark a run ended from outside its training process (the data-parallel wrapper, after its workers are
    gone): the last status the main process wrote, or a new one, with `state` and `fields`."""
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        status = {"step": 0, "pid": os.getpid(), "started_at": time.time()}
    now = time.time()
    status.update(state=state, heartbeat=now, updated_at=now, **fields)
    atomic_write_json(path, status)


# A LoRA's metadata key for the name of the run folder that trained it (the job id under the server): a
# name, never a path. The file records a local base model by its folder's name only (training/export.py);
# the run's config.yaml has the whole path, which generate-image and convert-lora need to find that model.
RUN_KEY = "training_run"


def trained_base_model(recorded: str, run: str | None, runs: Path) -> str:
    """The base model a LoRA of ours was trained on: `recorded` (its training config's model_name), or, where
    the run named `run` is in `runs` and its config names a local model whose last part is `recorded`, that
    model's path. A run name from a file made elsewhere finds nothing, or a model of the name it records."""
    if not run or Path(run).name != run or run in (".", ".."):
        return recorded
    import yaml  # the server imports this module at start-up; yaml only where a LoRA is looked up

    try:
        trained = yaml.safe_load((runs / run / "config.yaml").read_text(encoding="utf-8")).get("model_name")
    except (OSError, yaml.YAMLError, AttributeError):  # a run deleted since, or never here
        return recorded
    if isinstance(trained, str) and trained != recorded and Path(trained).expanduser().name == recorded:
        return trained
    return recorded
