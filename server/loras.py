"""Exported LoRA files: `<workspace>/loras/<name>.safetensors`, each with a `.json` sidecar of
its metadata, and reading any LoRA or run file back in pieces for download."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from server.errors import ServiceError, WorkspaceStateError
from server.names import checked_name, plain_filename_problem
from server.safetensors_file import InvalidSafetensors, safetensors_metadata
from training.request_child import RequestRefused, run_request
from training.published_loras import SUFFIX, lora_record, publish
from training.workspace import atomic_write_json

if TYPE_CHECKING:
    from server.jobs import JobService

# Clients cap a tool result near 1 MB and base64 adds a third: 512 KiB of file is ~700 KB of text,
# and the largest chunk, 720 KiB, stays just under 1 MB.
DEFAULT_CHUNK = 512 * 1024
MAX_CHUNK = 720 * 1024


class ExportedLora(BaseModel):
    name: str = Field(
        description="File name in loras/, without .safetensors; every tool that takes a LoRA accepts it as given."
    )
    path: str
    size_bytes: int
    job_id: str | None = None
    step: int | None = None
    trigger_word: str | None = None
    base_model: str | None = None
    output_format: str | None = None


class Chunk(BaseModel):
    path: str = Field(description="The file, as asked for.")
    offset: int
    length: int = Field(description="Bytes in this chunk.")
    total_size: int
    eof: bool = Field(description="True when this chunk reaches the end of the file.")
    data: str = Field(description="The bytes, base64-encoded.")
    next_offset: int | None = Field(description="Offset to ask for next, or null at the end.")


class ExportRequest(BaseModel):
    """export-model: a job's LoRA into loras/."""

    job_id: str = Field(description="Job id from start-training.")
    step: int | None = Field(None, ge=1, description="A checkpoint step; default: the final LoRA.")
    output_format: Literal["kohya", "diffusers"] | None = Field(
        None,
        description="kohya for ComfyUI/A1111, or diffusers; default: as the run wrote it (kohya for SD 1.x/2.x "
        "and SDXL, diffusers for FLUX, which ComfyUI loads too).",
    )


class ChunkRequest(BaseModel):
    """download-model: one piece of an exported LoRA or a run file."""

    path: str = Field(
        description="An exported LoRA's name (with or without .safetensors), or '<job_id>/<file>' in a job's run "
        "directory."
    )
    offset: int = Field(0, ge=0, description="Byte offset to start at.")
    length: int = Field(DEFAULT_CHUNK, ge=1, le=MAX_CHUNK, description="Bytes to read (at most 720 KiB).")


class LoraService:
    def __init__(self, workspace: Path):
        self.workspace = Path(workspace)
        self.folder = self.workspace / "loras"

    def export(self, request: ExportRequest, jobs: JobService) -> ExportedLora:
        """Copy a job's final LoRA (or the checkpoint LoRA of `step`) into loras/, with its sidecar; in
        `output_format`, or as trained when None. The file is named after the job's config."""
        job_id, step = request.job_id, request.step
        job = jobs.training_status(job_id)
        run_dir = Path(job.run_dir)
        source, label = job_lora_file(job_id, run_dir, step)
        try:
            metadata = safetensors_metadata(source)
        except InvalidSafetensors as exc:
            raise WorkspaceStateError(
                f"job {job_id}'s LoRA {source.name} is damaged ({exc}); train or resume again"
            ) from None
        trained_format = json.loads(metadata.get("training_config", "{}")).get("output_format") or "kohya"
        output_format = request.output_format or trained_format

        def write(tmp: Path) -> None:
            if output_format == trained_format:
                shutil.copyfile(source, tmp)
            else:
                _convert(source, tmp, output_format)

        # Never over another job's file: a later job's LoRA of the same config gets `<name>-2`, ...
        target = publish(self.folder, f"{job.config_name}{label}", job_id, write)
        record = ExportedLora(**lora_record(target, safetensors_metadata(target), job_id, step))
        record.output_format = output_format
        atomic_write_json(target.with_suffix(".json"), record.model_dump(mode="json"))
        return record

    def list(self) -> list[ExportedLora]:
        if not self.folder.is_dir():
            return []
        found = []
        for path in sorted(self.folder.glob("*.safetensors")):
            sidecar = path.with_suffix(".json")
            known = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.exists() else {}
            found.append(
                ExportedLora(**{**known, "name": path.stem, "path": str(path), "size_bytes": path.stat().st_size})
            )
        return found

    def read_chunk(self, request: ChunkRequest, jobs: JobService) -> Chunk:
        """Bytes of a file under loras/ (`name.safetensors`) or a job's run directory (`<job_id>/<file>`)."""
        relative, offset, length = request.path, request.offset, request.length
        path = self._downloadable(relative, {job.job_id: Path(job.run_dir) for job in jobs.list()})
        total = path.stat().st_size
        if offset < 0 or offset > total:
            raise ServiceError(f"offset {offset} is outside the file ({total} bytes); start at 0")
        length = max(1, min(length, MAX_CHUNK))
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read(length)
        end = offset + len(data)
        return Chunk(
            path=relative,
            offset=offset,
            length=len(data),
            total_size=total,
            eof=end >= total,
            data=base64.b64encode(data).decode("ascii"),
            next_offset=None if end >= total else end,
        )

    def _downloadable(self, relative: str, run_dirs: dict[str, Path]) -> Path:
        parts = Path(relative).parts
        if not relative or Path(relative).is_absolute() or any(plain_filename_problem(part) for part in parts):
            raise ServiceError(
                f"path {relative!r} is not allowed: give a file in loras/ (e.g. my-lora.safetensors) or "
                "<job_id>/<file> of a job's run directory"
            )
        if len(parts) == 1:
            path = self.folder / parts[0]
            if not path.is_file():  # the name list-exported-models gives, without .safetensors
                path = exported_path(self.folder, parts[0])
        else:
            job_id = checked_name("job", parts[0])
            if job_id not in run_dirs:
                raise WorkspaceStateError(f"no job {job_id!r}; list-training-jobs shows the jobs there are")
            path = run_dirs[job_id].joinpath(*parts[1:])
        if not path.is_file():
            raise WorkspaceStateError(f"no file {relative!r}; list-exported-models lists the exported LoRAs")
        return path


def job_lora_file(job_id: str, run_dir: Path, step: int | None) -> tuple[Path, str]:
    """A training job's final LoRA (`step` None) or the LoRA of its checkpoint at `step`, with the label its
    export's name gets ('' or '-step<N>'); a LoRA not there is a WorkspaceStateError saying what there is."""
    if step is None:
        finals = [p for p in run_dir.glob("*.safetensors") if not p.name.startswith(".")]
        if not finals:
            raise WorkspaceStateError(
                f"job {job_id} has no final LoRA yet; wait for it to complete, or export a checkpoint with step"
            )
        return finals[0], ""
    folder = run_dir / "checkpoints" / f"step{step:06d}"
    files = sorted(folder.glob("*.safetensors"))
    finals = [p for p in run_dir.glob("*.safetensors") if not p.name.startswith(".")]
    if not files and finals and _steps_of(finals[0]) == step:
        return finals[0], ""  # the last step is the final LoRA, not a checkpoint
    if not files:
        kept = (
            sorted(p.name for p in (run_dir / "checkpoints").glob("step*"))
            if (run_dir / "checkpoints").is_dir()
            else []
        )
        raise WorkspaceStateError(
            f"job {job_id} has no checkpoint at step {step}; checkpoints kept: {kept or 'none'}"
        )
    return files[0], f"-step{step:06d}"


def exported_path(folder: Path, name: str) -> Path:
    """The file of the exported LoRA `name` in `folder`, named as any tool gives it: with or without
    `.safetensors`."""
    return folder / f"{name.removesuffix(SUFFIX)}{SUFFIX}"


def _steps_of(lora: Path) -> int | None:
    """The step a LoRA file was saved at (kohya's ss_steps), if it says."""
    try:
        steps = safetensors_metadata(lora).get("ss_steps")
    except InvalidSafetensors:
        return None
    return int(steps) if steps and steps.isdigit() else None


def _convert(source: Path, target: Path, output_format: str) -> None:
    """Rewrite the LoRA in the other layout, in a child process: the conversion imports torch and diffusers,
    which the server never does (seconds)."""
    try:
        run_request("training.convert", source=str(source), target=str(target), output_format=output_format)
    except RequestRefused as exc:
        raise WorkspaceStateError(f"cannot convert the LoRA to {output_format}: {exc}") from None
