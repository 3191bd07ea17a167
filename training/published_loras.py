"""Putting a job's LoRA into the workspace's `loras/` folder, where list-exported-models, download-model
and every tool that takes a LoRA by name find it: `<name>.safetensors` beside a `.json` sidecar.

Every writer into loras/ publishes through `publish`: a queued training job its final LoRA as it
completes (the run keeps its own copy), export-model a job's LoRA or checkpoint, merge-loras and
convert-lora their results, upload-lora-chunked-finish an uploaded file. A name never takes over a file
there: when `<name>.safetensors` (or its sidecar) exists, the next free `<name>-2`, `<name>-3`, ... is
used and reported; where the user asked for an exact name (merge-loras' and convert-lora's output_name,
an upload's filename) it is refused with NameTaken instead. The same job publishing again replaces its
own file.

The trainer's child and the server both publish, without sharing a lock: the new file is linked into
place (`os.link` fails when the name exists), so two publishers never write one name, and a check made
before a long merge cannot go stale: the name is taken or not at the moment of the link. A filesystem
without hard links (FAT, some network drives) gets the same guarantee from an exclusive create
(`copy_to_new_name`), at the cost of a name that exists, partly written, while its bytes are copied.
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


class NameTaken(FileExistsError):
    """The exact name asked for holds a LoRA already; `path` is that file."""

    def __init__(self, path: Path):
        super().__init__(f"{path.name} exists already")
        self.path = path


def name_taken(folder: Path, name: str) -> bool:
    """Whether `<name>.safetensors` or its sidecar exists in `folder` (an early check; `publish` decides)."""
    target = folder / f"{name}{SUFFIX}"
    return target.exists() or target.is_symlink() or target.with_suffix(".json").exists()


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


def publish(
    folder: Path, name: str, job_id: str | None, write: Callable[[Path], None], *, exact: bool = False
) -> Path:
    """Write a LoRA with `write(temporary path)` and put it into `folder` as `<name>.safetensors`, or the
    first free numbered name when that one holds a file that is not `job_id`'s (NameTaken when `exact`).
    The temporary file is `<name>.safetensors` in a hidden folder beside, so a writer that records its
    file's name (merge's ss_output_name) records `name`. Returns the path used; its sidecar is for the
    caller to write (`lora_record`)."""
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder))
    tmp = staging / f"{name}{SUFFIX}"
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
                    _link_or_copy(tmp, target)
                    return target
                except FileExistsError:
                    pass
            if exact:
                raise NameTaken(target)
            number += 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _link_or_copy(source: Path, target: Path) -> None:
    """Put `source` at `target`, a name that must be free (FileExistsError otherwise)."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (EPERM on FAT, ENOTSUP or EOPNOTSUPP on some network filesystems)
        copy_to_new_name(source, target)


def copy_to_new_name(source: Path, target: Path) -> None:
    """Copy `source` to `target`, which is created exclusively: FileExistsError when the name exists, so
    no file is ever overwritten. A copy that fails (disk full, a dropped network drive) removes what it
    wrote, so no half file stays under the name."""
    out = open(target, "xb")
    try:
        with out, open(source, "rb") as src:
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        target.unlink(missing_ok=True)
        raise


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
