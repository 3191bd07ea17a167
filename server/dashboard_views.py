"""What the web dashboard and the `show-training-dashboard` MCP App show, built from the services the tools
call: a job's status, its metrics thinned for a chart, its samples by step and prompt, its log tail, its
diagnosis and config; the datasets with their images and reports.

The views are pydantic models, sent as `model_dump(mode="json")`; the same JobView feeds the page's
renderJob and the App's, and its `summary` is the text a client without Apps reads. Nothing here imports
torch: the server process builds these.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from PIL import Image
from pydantic import BaseModel, Field

from server.dataset_contents import CAPTION_SUFFIX, dataset_files
from server.diagnostics import diagnose
from server.errors import ServiceError, WorkspaceStateError
from server.images import encoded
from server.inspection import dataset_folder, dataset_image, dataset_info
from server.jobs import RESUMABLE_STATES, JobStatus
from training.data.dataset import IMAGE_SUFFIXES
from training.data.report import DatasetReport
from training.diagnostics import Finding
from training.diagnostics.training_rules import format_duration
from training.image_files import upright_image, upright_size
from training.run_files import smoothed_series
from training.workspace import read_jsonl

if TYPE_CHECKING:
    from server.tools import Services

MAX_CHART_POINTS = 2000  # per series: a 10,000-step run thinned to this draws in well under a second
LOG_TAIL_LINES = 60
THUMBNAIL_SIDE = 256  # the dataset page's thumbnails, longest side in pixels
# Job views whose parts are kept: every step's event makes each open tab of a job fetch its view, and reading
# 10,000 steps of metrics.jsonl and diagnosing them takes ~0.4 s; a few parts of 2,000 points each per job.
CACHED_JOBS = 16


class JobRow(BaseModel):
    """One job as the jobs table and the event stream show it."""

    job_id: str
    kind: str
    config_name: str
    state: str
    step: int
    total_steps: int | None
    percent: float | None
    eta_s: float | None
    devices: list[str]
    loss: float | None
    error: str | None
    can_stop: bool = Field(description="queued or running: stop-training takes it")
    can_resume: bool = Field(description="stopped, interrupted or failed: resume-training takes it")


class JobsOverview(BaseModel):
    jobs: list[JobRow] = Field(description="Newest first.")


class MetricSeries(BaseModel):
    """metrics.jsonl as the charts draw it: the per-step series share `steps`; validation has its own steps."""

    steps: list[int] = Field(default_factory=list)
    loss: list[float | None] = Field(default_factory=list, description="Raw loss of each step.")
    loss_smoothed: list[float | None] = Field(default_factory=list, description="The EMA status.json shows.")
    lr: list[float | None] = Field(default_factory=list)
    grad_norm: list[float | None] = Field(default_factory=list)
    validation_steps: list[int] = Field(default_factory=list)
    validation_loss: list[float] = Field(default_factory=list)
    total_points: int = Field(0, description="Per-step rows before thinning to MAX_CHART_POINTS.")


class SampleCell(BaseModel):
    step: int
    prompt_index: int
    prompt: str
    control: bool = Field(description="The control prompt (no trigger word): it should stay like step 0.")
    filename: str = Field(description="As lora://jobs/{job_id}/samples/{filename} and the files route take it.")


class JobView(BaseModel):
    status: JobStatus
    row: JobRow
    metrics: MetricSeries
    samples: list[SampleCell] = Field(description="By step, then prompt.")
    log_tail: str
    findings: list[Finding] = Field(description="diagnose-training's; empty for a run without any or another kind.")
    config_yaml: str | None
    summary: str = Field(description="A few lines of plain text, for people and for clients without MCP Apps.")


class DatasetRow(BaseModel):
    """A dataset as list-datasets gives it."""

    name: str
    images: int
    captioned: int
    size_bytes: int


class DatasetsOverview(BaseModel):
    datasets: list[DatasetRow]


class DatasetImage(BaseModel):
    filename: str = Field(description="Relative to the dataset, e.g. 'a.png' or '10_cat/a.png'.")
    caption: str | None
    width: int
    height: int


class DatasetView(BaseModel):
    name: str
    images: list[DatasetImage]
    report: DatasetReport = Field(description="get-dataset-info's report.")


class DashboardViews:
    """The views over the tools' services (server.tools.Services); errors are theirs (ServiceError)."""

    def __init__(self, services: Services):
        self.s = services
        self.parts = PartsCache(CACHED_JOBS)

    def jobs(self) -> JobsOverview:
        statuses = sorted(self.s.jobs.list(), key=lambda status: status.created_at, reverse=True)
        return JobsOverview(jobs=[job_row(status) for status in statuses])

    def job(self, job_id: str) -> JobView:
        """The job's view. Its metrics, samples and findings are rebuilt only when the files they are read from
        change (PartsCache); the status is asked once, and a part's service asks again only on a rebuild."""
        status = self.s.jobs.status(job_id)
        training = status.kind == "training"
        run_dir = Path(status.run_dir)
        metrics_file, index_file = run_dir / "metrics.jsonl", run_dir / "samples" / "index.jsonl"
        metrics = (
            self.parts.get(job_id, "metrics", _stamp(metrics_file), lambda: thinned_metrics(read_jsonl(metrics_file)))
            if training
            else MetricSeries()
        )
        samples = self.parts.get(job_id, "samples", _stamp(index_file), lambda: self._samples(status))
        # The evidence diagnose() reads: the metrics, the samples' statistics, the config, the state.
        evidence = (*map(_stamp, (metrics_file, index_file, run_dir / "config.yaml", run_dir / "request.yaml")),
                    status.state, status.error)
        findings = self.parts.get(job_id, "findings", evidence, lambda: self._findings(job_id)) if training else []
        return JobView(
            status=status,
            row=job_row(status),
            metrics=metrics,
            samples=samples,
            log_tail=self.s.jobs.logs(job_id, LOG_TAIL_LINES),
            findings=findings,
            config_yaml=_run_config(run_dir) if training else None,
            summary=job_summary(status, samples, findings),
        )

    def _findings(self, job_id: str) -> list[Finding]:
        """diagnose-training's findings. The dataset's image count among their evidence is read on a rebuild
        only: a dataset changed under a finished job shows in its findings once the run's files change, or after a
        restart."""
        try:
            return diagnose(self.s.jobs, job_id).findings
        except ServiceError:  # a config that no longer reads: the job's page still shows, its error says why
            return []

    def _samples(self, status: JobStatus) -> list[SampleCell]:
        """The job's samples by step, then prompt; none for a job that renders none (yet)."""
        if status.kind not in ("training", "generation"):
            return []
        try:
            table = self.s.training.sample_table(status.job_id)
        except WorkspaceStateError:  # no samples yet, or their files are gone: the view shows none
            return []
        return [
            SampleCell(step=step, prompt_index=index, prompt=prompt, control=control, filename=path.name)
            for (step, index), path in sorted(table.files.items())
            for prompt, control in [table.prompts[index]]
        ]

    def datasets(self) -> DatasetsOverview:
        rows = [DatasetRow(**summary.model_dump()) for summary in self.s.datasets.list()]
        return DatasetsOverview(datasets=rows)

    def dataset(self, name: str) -> DatasetView:
        folder = dataset_folder(self.s.workspace, name)
        report = dataset_info(self.s.workspace, name)
        return DatasetView(name=name, images=_dataset_images(folder), report=report)

    def thumbnail(self, name: str, filename: str) -> bytes:
        """A JPEG of the dataset image `filename` ('a.png', '10_cat/a.png'), upright, longest side
        THUMBNAIL_SIDE (a smaller image is not enlarged)."""
        path = dataset_image(self.s.workspace, name, filename.split("/"))
        with upright_image(path) as image:
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            return encoded(image, "jpeg")

    def latest_job_id(self) -> str | None:
        """A running job (the newest of them), else the newest job; None when there is none."""
        jobs = self.jobs().jobs
        running = [row for row in jobs if row.state == "running"]
        return (running or jobs)[0].job_id if jobs else None


Part = TypeVar("Part")


class PartsCache:
    """The parts of the job views built last, each under the key of what it was built from (the stats of its
    files); a part whose key is unchanged is not built again. The views are built in worker threads, so a lock
    guards the table; a part is built outside it, and two threads that miss at once both build it (same
    result). It holds the parts of the `jobs` jobs used last: a job's parts go together."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self._lock = threading.Lock()
        self._parts: OrderedDict[str, dict[str, tuple[object, object]]] = OrderedDict()

    def get(self, job_id: str, part: str, key: object, build: Callable[[], Part]) -> Part:
        with self._lock:
            kept = self._parts.get(job_id, {}).get(part)
            if kept is not None and kept[0] == key:
                self._parts.move_to_end(job_id)
                return kept[1]
        value = build()
        with self._lock:
            self._parts.setdefault(job_id, {})[part] = (key, value)
            self._parts.move_to_end(job_id)
            while len(self._parts) > self.jobs:
                self._parts.popitem(last=False)
        return value


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when `path` is written: its inode (an atomic rewrite is a new file), size and mtime; None
    while it does not exist. Taken before the file is read, so a write during the read shows as a change."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def job_row(status: JobStatus) -> JobRow:
    """The row of the jobs table (and of a `job` event) for `status`."""
    return JobRow(
        **status.model_dump(include=set(JobRow.model_fields) - {"can_stop", "can_resume"}),
        can_stop=status.state in ("queued", "running"),
        can_resume=status.state in RESUMABLE_STATES,
    )


def thinned_metrics(rows: list[dict]) -> MetricSeries:
    """metrics.jsonl's rows as chart series of at most MAX_CHART_POINTS points: the first and the last step,
    and in each bucket of steps between them the lowest and the highest raw loss, so spikes and the spread
    survive the thinning. The smoothing runs over every step before it."""
    steps = [row for row in rows if "kind" not in row and isinstance(row.get("step"), int)]
    loss = [_finite(row.get("loss")) for row in steps]
    smooth = smoothed_series(loss)
    kept = _extremes(loss, MAX_CHART_POINTS)
    validation = [row for row in rows if row.get("kind") == "validation" and _finite(row.get("loss")) is not None]
    validation = [validation[i] for i in _spread(len(validation), MAX_CHART_POINTS)]
    return MetricSeries(
        steps=[steps[i]["step"] for i in kept],
        loss=[loss[i] for i in kept],
        loss_smoothed=[smooth[i] for i in kept],
        lr=[_finite(steps[i].get("lr")) for i in kept],
        grad_norm=[_finite(steps[i].get("grad_norm")) for i in kept],
        validation_steps=[row["step"] for row in validation],
        validation_loss=[row["loss"] for row in validation],
        total_points=len(steps),
    )


def _extremes(values: list[float | None], most: int) -> list[int]:
    """Indexes of `values` to keep, at most `most`: all when they fit, else the first, the last and each
    bucket's lowest and highest value (its first index where it has no value), in order."""
    if len(values) <= most:
        return list(range(len(values)))
    buckets = (most - 2) // 2
    inner = len(values) - 2
    kept = {0, len(values) - 1}
    for bucket in range(buckets):
        indexes = range(1 + bucket * inner // buckets, 1 + (bucket + 1) * inner // buckets)
        known = [i for i in indexes if values[i] is not None]
        if known:
            kept |= {min(known, key=values.__getitem__), max(known, key=values.__getitem__)}
        elif indexes:
            kept.add(indexes[0])
    return sorted(kept)


def _spread(count: int, most: int) -> list[int]:
    """`most` indexes of `count` evenly spread, the first and the last among them (all when they fit)."""
    if count <= most:
        return list(range(count))
    return [round(i * (count - 1) / (most - 1)) for i in range(most)]


def _finite(value: object) -> float | None:
    """A number a chart can draw: NaN and infinity (a diverged step) are None, as is a missing value (JSON has
    no NaN)."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def job_summary(status: JobStatus, samples: list[SampleCell], findings: list[Finding]) -> str:
    """A few lines an assistant (or a person) reads: state and progress, loss, ETA, the latest samples, the
    top finding with its fix, the LoRA when done."""
    total = f"/{status.total_steps}" if status.total_steps else ""
    percent = f" ({status.percent:.0f}%)" if status.percent is not None else ""
    lines = [
        f"{status.kind} job {status.job_id} ({status.config_name}): {status.state}, step {status.step}{total}{percent}"
    ]
    if status.loss is not None:
        lines.append(f"loss {status.loss:.4g} (smoothed)" + (f", lr {status.lr:.3g}" if status.lr is not None else ""))
    if status.eta_s is not None:
        lines.append(f"ETA {format_duration(status.eta_s)}")
    if status.phase and status.phase != "training":
        lines.append(f"now: {status.phase}")
    if samples:
        last = samples[-1].step
        files = ", ".join(f"lora://jobs/{status.job_id}/samples/{c.filename}" for c in samples if c.step == last)
        lines.append(f"latest samples (step {last}): {files}")
    if status.error:
        lines.append(f"error: {status.error}")
    if findings:
        top = findings[0]
        fix = f"; fix: apply-fix job_id={status.job_id} finding_id={top.rule} ({top.patch})" if top.patch else ""
        lines.append(f"top finding ({top.severity}): {top.message}{fix}")
    if status.state == "completed" and (status.exported_lora or status.lora_path):
        lines.append(
            f"LoRA: {status.exported_lora or status.lora_path}"
            + (f" ({status.lora_path})" if status.exported_lora and status.lora_path else "")
        )
    return "\n".join(lines)


def _run_config(run_dir: Path) -> str | None:
    """The config the run trains with: the trainer's resolved config.yaml, before it exists the request.yaml
    the job was started with."""
    for name in ("config.yaml", "request.yaml"):
        with contextlib.suppress(OSError):
            return (run_dir / name).read_text(encoding="utf-8")
    return None


def _dataset_images(folder: Path) -> list[DatasetImage]:
    """The dataset's images (subfolders included, hidden entries skipped), by path, with their captions as
    written and their upright sizes (read from the headers)."""
    images = []
    for path in sorted(dataset_files(folder)):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        caption = path.with_suffix(CAPTION_SUFFIX)
        try:
            with Image.open(path) as image:
                width, height = upright_size(image)
        except (OSError, ValueError):  # unreadable: get-dataset-info's report says so; the page lists the rest
            continue
        images.append(
            DatasetImage(
                filename=path.relative_to(folder).as_posix(),
                caption=caption.read_text(encoding="utf-8", errors="replace").strip() if caption.is_file() else None,
                width=width,
                height=height,
            )
        )
    return images
