"""generate-captions: captions for a dataset's images, by template or by a captioning model.

A set a model would take more than ~30 s over runs as a background job in the job table (see
`JobService.start_captioning`); a quick one is captioned inside the call, by the same child process
when a model writes the captions (it needs torch, which the server never imports).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from server.errors import ServiceError, WorkspaceStateError
from server.names import checked_name
from server.paths import check_user_path
from training.captioning import CaptionJob, CaptionRequest, captioner_for, write_captions
from training.data.dataset import image_files
from training.jobs.store import JobRecord
from training.request_child import NO_CONSOLE_WINDOW
from training.run_files import RunFiles
from training.workspace import read_jsonl

# A BLIP-base-sized model takes up to ~2.1 s an image on this 2-core CPU (bench/caption_time.py, 40 tokens),
# so more than 14 images is past the ~30 s an assistant should wait inside one call.
INLINE_MODEL_IMAGES = 14
LISTED_CAPTIONS = 100  # captions listed in one result; the files hold them all
CAPTION_POLL_S = 0.25  # how often a model's captions are read while its child works: ~1/8 of one image's time


class CaptionedFile(BaseModel):
    file: str
    caption: str


class SkippedFile(BaseModel):
    file: str
    reason: str


class CaptionRun(BaseModel):
    dataset: str = Field(description="The dataset folder.")
    caption_model: str
    captioned: int = Field(description="Captions written (0 when a background job was started).")
    kept: int = Field(description="Images that already had a caption and were left alone (overwrite=false).")
    files: list[CaptionedFile] = Field(description=f"The captions written (at most {LISTED_CAPTIONS} listed).")
    skipped: list[SkippedFile] = Field(default_factory=list, description="Files that are not readable images.")
    job_id: str | None = Field(
        None,
        description="Set when the set runs as a background job: get-training-status job_id=<job_id> shows "
        "its progress (step = images captioned), get-training-logs the captions as they are written.",
    )
    next_step: str


class CaptionPlan(BaseModel):
    """What a generate-captions call will do, checked before anything is written."""

    request: CaptionRequest
    label: str = Field(description="A name for the job: the dataset name, or the folder's name made safe.")
    images: int
    job: dict = Field(description="training.captioning.CaptionJob, as the background job reads it.")


def plan_captions(workspace: Path, **request: Any) -> CaptionPlan:
    """Check the dataset and the model (present, loadable kind) and list the images to caption.
    `request`: a CaptionRequest's fields, as generate-captions takes them; the model checks them."""
    from training.captioners import CaptionerUnavailable, find_caption_model

    checked = CaptionRequest.model_validate(request)
    folder = _dataset_folder(workspace, checked.dataset_name, checked.dataset_path)
    images = image_files(folder, recursive=True)
    if not images:
        raise WorkspaceStateError(f"{folder} has no images (jpg, jpeg, png, webp) to caption")
    todo = [p for p in images if checked.overwrite or not p.with_suffix(".txt").is_file()]
    model = checked.caption_model
    if todo and model != "template":
        try:
            model = str(find_caption_model(model))
        except CaptionerUnavailable as exc:
            raise ServiceError(str(exc)) from None
    job = CaptionJob(
        **checked.model_dump(include={"trigger_word", "prefix", "suffix", "caption_prompt"}),
        folder=str(folder),
        files=[str(p.relative_to(folder)) for p in todo],
        caption_model=model,
    )
    label = checked.dataset_name or re.sub(r"[^A-Za-z0-9._-]+", "_", folder.name).strip("._-")[:60] or "dataset"
    return CaptionPlan(request=checked, label=label, images=len(images), job=job.model_dump())


def caption_or_queue(
    workspace: Path,
    background: bool | None,
    start_job: Callable[[str, str], JobRecord],
    on_progress: Callable[[int, int], None] | None = None,
    **request: Any,
) -> CaptionRun:
    """generate-captions: caption inside the call, or start a background job with `start_job(label,
    job_json)` (see runs_in_background)."""
    plan = plan_captions(workspace, **request)
    if runs_in_background(plan, background):
        record = start_job(plan.label, json.dumps(plan.job))
        return caption_job_started(plan, plan.request.caption_model, record.job_id)
    return caption_now(plan, plan.request.caption_model, on_progress=on_progress)


def runs_in_background(plan: CaptionPlan, background: bool | None) -> bool:
    """The caller's choice, else: a model (not the template) with more than INLINE_MODEL_IMAGES images."""
    files = plan.job["files"]
    if not files:
        return False
    if background is not None:
        return background
    return plan.job["caption_model"] != "template" and len(files) > INLINE_MODEL_IMAGES


def caption_now(
    plan: CaptionPlan, caption_model: str, on_progress: Callable[[int, int], None] | None = None
) -> CaptionRun:
    """Caption the plan's images inside this call, reporting progress after each batch: by template here,
    by a model in the background job's own child (the model needs torch, which the server never imports)."""
    job = CaptionJob(**plan.job)
    folder = Path(job.folder)
    if not job.files:
        return CaptionRun(
            dataset=job.folder,
            caption_model=caption_model,
            captioned=0,
            kept=plan.images,
            files=[],
            next_step="every image already has a caption: pass overwrite=true to replace them, or lint-captions",
        )
    if job.caption_model == "template":
        describe = captioner_for("template", folder)  # reads the images with PIL alone
        batches = write_captions(folder, [folder / name for name in job.files], describe, job)
    else:
        batches = _captions_by_child(job)
    written, skipped = [], []
    for batch_written, batch_skipped in batches:
        written += [CaptionedFile(file=name, caption=caption) for name, caption in batch_written]
        skipped += [SkippedFile(file=name, reason=reason) for name, reason in batch_skipped]
        if on_progress:
            on_progress(len(written) + len(skipped), len(job.files))
    return CaptionRun(
        dataset=job.folder,
        caption_model=caption_model,
        captioned=len(written),
        kept=plan.images - len(job.files),
        files=written[:LISTED_CAPTIONS],
        skipped=skipped,
        next_step="read a few captions, refine them with update-captions, then lint-captions",
    )


def _captions_by_child(job: CaptionJob) -> Iterator[tuple[list[tuple[str, str]], list[tuple[str, str]]]]:
    """The captions of `job`, as write_captions yields them, from the captioning job's child (`python -m
    training.captioning`) in a temporary run directory: its captions.jsonl is read as it grows."""
    with tempfile.TemporaryDirectory(prefix="captions-") as tmp:
        run_dir = Path(tmp)
        (run_dir / "request.json").write_text(job.model_dump_json(), encoding="utf-8")
        with open(run_dir / "process.log", "wb") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "training.captioning", str(run_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                creationflags=NO_CONSOLE_WINDOW,
            )
        try:
            seen, ended = 0, False
            while not ended:
                ended = child.poll() is not None  # rows written before the end are read once more below
                rows = read_jsonl(run_dir / "captions.jsonl")[seen:]
                seen += len(rows)
                if rows:
                    yield (
                        [(row["file"], row["caption"]) for row in rows if "caption" in row],
                        [(row["file"], row["skipped"]) for row in rows if "skipped" in row],
                    )
                if not ended:
                    time.sleep(CAPTION_POLL_S)
        finally:  # the call was abandoned (the client went away): no child goes on writing captions
            if child.poll() is None:
                child.kill()
                child.wait()
        status = RunFiles(run_dir).status
        state = json.loads(status.read_text(encoding="utf-8")) if status.is_file() else {}
        if state.get("state") != "completed":
            # the model's own refusal (CaptionerUnavailable), or "<Type>: message" of a crash
            raise ServiceError(state.get("error") or f"captioning failed (exit code {child.returncode})")


def caption_job_started(plan: CaptionPlan, caption_model: str, job_id: str) -> CaptionRun:
    return CaptionRun(
        dataset=plan.job["folder"],
        caption_model=caption_model,
        captioned=0,
        kept=plan.images - len(plan.job["files"]),
        files=[],
        job_id=job_id,
        next_step=f"{len(plan.job['files'])} images are being captioned in the background: poll "
        f"get-training-status job_id={job_id} (step = images done); get-training-logs shows the captions; "
        "when it is completed, lint-captions",
    )


def _dataset_folder(workspace: Path, dataset_name: str | None, dataset_path: str | None) -> Path:
    if (dataset_name is None) == (dataset_path is None):
        raise ServiceError("give either dataset_name (from list-datasets) or dataset_path (a folder)")
    if dataset_name is not None:
        folder = Path(workspace) / "datasets" / checked_name("dataset", dataset_name)
    else:
        check_user_path("dataset_path", dataset_path, workspace)
        given = Path(dataset_path).expanduser()
        folder = given if given.is_absolute() else Path(workspace) / given
    if not folder.is_dir():
        raise WorkspaceStateError(f"no dataset folder {folder}; list-datasets shows the datasets there are")
    return folder.resolve()
