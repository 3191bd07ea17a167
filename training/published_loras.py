"""Putting a job's LoRA into the workspace's `loras/` folder, where list-exported-models, download-model
and every tool that takes a LoRA by name find it: `<name>.safetensors` beside a `.json` sidecar.

A queued training job publishes its final LoRA as it completes (the run keeps its own copy), and
export-model publishes a job's LoRA or checkpoint on request. A name never takes over another job's
file: when `<name>.safetensors` holds one (or a LoRA from elsewhere), the next free `<name>-2`,
`<name>-3`, ... is used and reported. The same job publishing again replaces its own file.

The trainer's child and the server both publish, without sharing a lock: the new file is linked into
place (`os.link` fails when the name exists), so two publishers never write one name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from training.jobs.queue import JOB_ID_VARIABLE
from training.workspace import FILE_MODE, atomic_write_json

SUFFIX = ".safetensors"


def lora_record(target: Path, metadata: dict[str, str], job_id: str | None, step: int | None = None) -> dict:
    """The sidecar of a published LoRA (server.loras.ExportedLora's fields), from its file's metadata."""
    trained = json.loads(metadata.get("training_config", "{}"))
    return {
        "name": target.stem,
        "path": str(target),
        "size_bytes": target.stat().st_size,
        "job_id": job_id,
        "step": int(metadata["ss_steps"]) if metadata.get("ss_steps", "").isdigit() else step,
        "trigger_word": metadata.get("modelspec.trigger_phrase"),
        "base_model": metadata.get("ss_sd_model_name"),
        "output_format": trained.get("output_format") or "kohya",
    }


def publish(folder: Path, name: str, job_id: str | None, write: Callable[[Path], None]) -> Path:
    """Write a LoRA with `write(temporary path)` and put it into `folder` as `<name>.safetensors`, or the
    first free numbered name when that one holds a file that is not `job_id`'s. Returns the path used;
    its sidecar is for the caller to write (`lora_record`)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(temporary)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        number = 1
        while True:
            target = folder / (f"{name}{SUFFIX}" if number == 1 else f"{name}-{number}{SUFFIX}")
            if job_id is not None and _owner(target) == job_id:
                os.replace(tmp, target)  # this job's own earlier copy
                return target
            if not target.with_suffix(".json").exists():
                try:
                    os.link(tmp, target)
                    return target
                except FileExistsError:
                    pass
            number += 1
    finally:
        tmp.unlink(missing_ok=True)


def publish_final_lora(lora: Path, config_name: str, folder: Path) -> Path | None:
    """A queued job's completed LoRA, copied into `folder` as `<config name>.safetensors` (or a numbered
    name) with its sidecar; None for a run the queue did not start (a user's own `lora-train`)."""
    job_id = os.environ.get(JOB_ID_VARIABLE)
    if not job_id:
        return None
    from safetensors import safe_open  # the trainer has it; the server reads metadata its own way

    target = publish(folder, config_name, job_id, lambda tmp: shutil.copyfile(lora, tmp))
    with safe_open(str(target), framework="np") as f:
        metadata = f.metadata() or {}
    atomic_write_json(target.with_suffix(".json"), lora_record(target, metadata, job_id))
    return target


def _owner(target: Path) -> str | None:
    """The job whose LoRA `target` is, by its sidecar; None for a file from elsewhere or none."""
    try:
        return json.loads(target.with_suffix(".json").read_text(encoding="utf-8")).get("job_id")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
