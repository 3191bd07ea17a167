"""The views behind the web dashboard and the MCP App (server/dashboard_views.py), over the session's workspace
where a real tiny training ran as a job (samples with a control prompt, a validation loss: `finished_training`)
and over finished jobs written by hand in a workspace of this module's: a 10,000-step metrics file thinned for the charts, stop and resume offered by state, the
datasets with their thumbnails, and the refusals of unknown or unsafe names."""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import fast_config
from PIL import Image

from server.app import open_services
from server.dashboard_views import (
    LOG_TAIL_LINES,
    MAX_CHART_POINTS,
    THUMBNAIL_SIDE,
    DashboardViews,
    JobView,
    PartsCache,
    job_row,
)
from server.errors import ServiceError, WorkspaceStateError
from server.jobs import JobStatus
from training.data.synthetic import make_shape_dataset
from training.jobs.store import JobRecord
from training.run_files import smoothed

STEPS = 10_000
SPIKE, DIP = (5_003, 9.0), (7_777, 0.001)  # one step each: thinning to 2,000 points must keep both


@pytest.fixture(scope="module")
def views(finished_training) -> DashboardViews:
    """The views over the session's finished training (tests/conftest.py), which the tests only read."""
    return DashboardViews(open_services(finished_training.workspace))


@pytest.fixture(scope="module")
def trained(finished_training) -> str:
    """The real training job: 4 steps, samples of one prompt (and the control prompt) at steps 0, 2, 4, a
    validation loss every 2 steps."""
    return finished_training.job_id


@pytest.fixture(scope="module")
def own(tmp_path_factory, tiny_sd15) -> DashboardViews:
    """The views over this module's own workspace, where tests write jobs and datasets by hand: the finished
    training's workspace keeps its one job as the latest for tests/test_dashboard_app.py."""
    root = tmp_path_factory.mktemp("dashboard-ws")
    (root / "models").symlink_to(tiny_sd15.parent)  # the session's built-in models, not built again
    make_shape_dataset(root / "datasets" / "shapes", 4, trigger_word="xyz_shape")
    return DashboardViews(open_services(root))


def hand_written_job(views: DashboardViews, job_id: str, state: str, **fields) -> Path:
    """A finished training job put in the table and its run directory by hand (no trainer runs)."""
    run_dir = views.s.workspace / "runs" / job_id
    run_dir.mkdir(parents=True)
    (run_dir / "request.yaml").write_text(fast_config(views.s.workspace / "datasets" / "shapes").to_yaml())
    record = JobRecord(job_id=job_id, config_name="cfg", state=state, run_dir=str(run_dir), created_at=time.time())
    views.s.jobs.store.insert(record.model_copy(update=fields))
    return run_dir


def test_a_trained_job_has_its_curves_samples_log_config_and_summary(views, trained):
    view = views.job(trained)
    metrics = view.metrics
    assert metrics.steps == [1, 2, 3, 4] and metrics.total_points == 4
    series = (metrics.loss, metrics.loss_smoothed, metrics.lr, metrics.grad_norm)
    assert all(len(values) == len(metrics.steps) for values in series)
    assert metrics.loss_smoothed[0] == metrics.loss[0]
    assert metrics.loss_smoothed[1] == pytest.approx(smoothed(metrics.loss[0], metrics.loss[1]))
    assert metrics.validation_steps == [0, 2, 4] and len(metrics.validation_loss) == 3  # step 0: the base model

    cells = [(cell.step, cell.prompt_index) for cell in view.samples]
    assert cells == sorted(cells) and {step for step, _ in cells} == {0, 2, 4}
    assert [cell.control for cell in view.samples if cell.step == 4] == [False, True]
    control = next(cell for cell in view.samples if cell.control)
    assert "xyz_shape" not in control.prompt and "red circle" in control.prompt
    for cell in view.samples:
        assert views.s.training.sample_path(trained, cell.filename).is_file()

    assert "step 4/4" in view.log_tail and len(view.log_tail.splitlines()) <= 2 * LOG_TAIL_LINES + 2
    assert "xyz_shape a red circle" in view.config_yaml
    assert view.row.state == "completed" and not view.row.can_stop and not view.row.can_resume
    assert view.status.lora_path and view.row.percent == 100.0
    lines = view.summary.splitlines()
    assert lines[0].startswith(f"training job {trained} (watched): completed, step 4/4")
    assert f"lora://jobs/{trained}/samples/{view.samples[-1].filename}" in view.summary
    assert any(line.startswith("LoRA: ") for line in lines)
    if view.findings:  # a 4-step run may well have some: the top one is named in the summary
        assert view.findings[0].message in view.summary
    # What the page and the App get: plain JSON that reads back as the same view.
    assert JobView.model_validate(json.loads(json.dumps(view.model_dump(mode="json")))) == view


def test_a_10000_step_run_is_thinned_keeping_its_ends_and_extremes(own):
    run_dir = hand_written_job(own, "long-run", "completed")
    rng = np.random.default_rng(0)
    losses = np.clip(0.3 * np.exp(-np.arange(STEPS) / 3000) + 0.05 + rng.normal(0, 0.02, STEPS), 0.01, 1.0)
    rows = []
    for step, loss in enumerate(losses, start=1):
        loss = dict([SPIKE, DIP]).get(step, float(loss))
        rows.append({"step": step, "loss": loss, "lr": 1e-4, "grad_norm": 0.5, "step_time": 0.1, "time": step})
        if step % 1000 == 0:
            rows.append({"kind": "validation", "step": step, "loss": loss + 0.02})
    rows[100]["loss"] = float("nan")  # a diverged step (101): no point, and no NaN in the JSON
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    metrics = own.job("long-run").metrics
    assert metrics.total_points == STEPS
    assert len(metrics.steps) <= MAX_CHART_POINTS and len(metrics.steps) > MAX_CHART_POINTS - 10
    assert all(len(s) == len(metrics.steps) for s in (metrics.loss, metrics.loss_smoothed, metrics.lr))
    assert metrics.steps == sorted(set(metrics.steps))
    assert (metrics.steps[0], metrics.steps[-1]) == (1, STEPS)
    drawn = dict(zip(metrics.steps, metrics.loss))
    assert drawn[SPIKE[0]] == SPIKE[1] == max(v for v in metrics.loss if v is not None)
    assert drawn[DIP[0]] == DIP[1] == min(v for v in metrics.loss if v is not None)
    assert metrics.validation_steps == list(range(1000, STEPS + 1, 1000))
    # The smoothing ran over every step, not over the kept ones: the EMA at the last step, recomputed here.
    average = None
    for row in rows:
        if "kind" not in row and math.isfinite(row["loss"]):
            average = smoothed(average, row["loss"])
    assert metrics.loss_smoothed[-1] == pytest.approx(average)
    assert 101 not in metrics.steps or drawn[101] is None
    assert "NaN" not in json.dumps(metrics.model_dump(mode="json"))


@pytest.mark.parametrize(
    ("state", "can_stop", "can_resume"),
    [
        ("queued", True, False),
        ("running", True, False),
        ("completed", False, False),
        ("stopped", False, True),
        ("interrupted", False, True),
        ("failed", False, True),
    ],
)
def test_stop_and_resume_are_offered_as_stop_training_and_resume_training_take_them(state, can_stop, can_resume):
    status = JobStatus(job_id="j", config_name="c", state=state, run_dir="/r", created_at=0.0)
    row = job_row(status)
    assert (row.can_stop, row.can_resume) == (can_stop, can_resume)


def test_jobs_come_newest_first_and_the_latest_job_is_the_newest(own):
    hand_written_job(own, "done-first", "completed")
    hand_written_job(own, "stopped-later", "stopped", created_at=time.time() + 60)
    rows = own.jobs().jobs
    ids = [row.job_id for row in rows]
    assert ids[0] == "stopped-later" and ids.index("stopped-later") < ids.index("done-first")
    assert rows[0].can_resume and not rows[0].can_stop
    assert own.latest_job_id() == "stopped-later"  # nothing runs: the newest


def test_a_failed_job_whose_config_no_longer_reads_still_has_its_view(own):
    run_dir = hand_written_job(own, "broken", "failed", error="the config was edited by hand")
    (run_dir / "request.yaml").write_text("steps: [\n")
    view = own.job("broken")
    assert view.findings == [] and view.config_yaml == "steps: [\n" and view.metrics.steps == []
    assert view.row.can_resume and "error: the config was edited by hand" in view.summary


def test_unknown_and_unsafe_names_are_refused_with_what_to_do(own):
    with pytest.raises(WorkspaceStateError, match="no job 'nope'; list-training-jobs"):
        own.job("nope")
    with pytest.raises(ServiceError, match=r"job name '\.\./x' is not allowed"):
        own.job("../x")
    with pytest.raises(WorkspaceStateError, match="no dataset 'nope'; list-datasets"):
        own.dataset("nope")
    with pytest.raises(ServiceError, match=r"dataset name '\.\./x' is not allowed"):
        own.dataset("../x")
    for filename in ("../shapes/shape_000.png", "missing.png", "shape_000.txt", ".hidden.png"):
        with pytest.raises(WorkspaceStateError, match="has no image .*get-dataset-info lists them"):
            own.thumbnail("shapes", filename)


def test_a_dataset_lists_its_images_upright_with_captions_and_its_report(own):
    folder = own.s.workspace / "datasets" / "photos" / "10_cat"
    folder.mkdir(parents=True)
    stored = Image.new("RGB", (600, 300), "red")
    stored.paste(Image.new("RGB", (300, 300), "blue"), (300, 0))  # left red, right blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to view, as a phone's portrait photo
    stored.save(folder / "portrait.jpg", exif=exif)
    (folder / "portrait.txt").write_text("a cat standing\n")
    Image.new("RGB", (40, 30), "green").save(folder / "small.png")

    rows = {row.name: row for row in own.datasets().datasets}
    assert (rows["photos"].images, rows["photos"].captioned) == (2, 1)
    assert (rows["shapes"].images, rows["shapes"].captioned) == (4, 4)

    view = own.dataset("photos")
    images = {image.filename: image for image in view.images}
    assert list(images) == ["10_cat/portrait.jpg", "10_cat/small.png"]
    assert (images["10_cat/portrait.jpg"].width, images["10_cat/portrait.jpg"].height) == (300, 600)
    assert images["10_cat/portrait.jpg"].caption == "a cat standing" and images["10_cat/small.png"].caption is None
    assert view.report.dataset.endswith("photos") and view.report.images == 2
    assert view.report.uncaptioned == ["10_cat/small.png"]

    thumbnail = Image.open(io.BytesIO(own.thumbnail("photos", "10_cat/portrait.jpg")))
    assert thumbnail.format == "JPEG" and thumbnail.size == (THUMBNAIL_SIDE // 2, THUMBNAIL_SIDE)
    top, bottom = thumbnail.getpixel((64, 20)), thumbnail.getpixel((64, 236))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # upright: the stored left side is on top
    assert Image.open(io.BytesIO(own.thumbnail("photos", "10_cat/small.png"))).size == (40, 30)  # not enlarged


def test_a_jobs_parts_are_built_again_when_their_files_change_and_only_then(own):
    """Every step's event makes each open tab fetch the job's view: its metrics, samples and findings are kept
    while metrics.jsonl and samples/index.jsonl stay as they were, and built again once either is written."""
    run_dir = hand_written_job(own, "kept-parts", "completed")
    metrics = run_dir / "metrics.jsonl"
    row = {"loss": 0.2, "lr": 1e-4, "grad_norm": 0.5, "step_time": 0.1}
    metrics.write_text("".join(json.dumps({"step": step, **row}) + "\n" for step in range(1, 31)))
    first = own.job("kept-parts")
    again = own.job("kept-parts")
    assert first.metrics.steps == list(range(1, 31)) and again.metrics is first.metrics
    assert again.findings == first.findings and all(a is b for a, b in zip(again.findings, first.findings))
    with metrics.open("a") as f:  # the trainer logs step 31
        f.write(json.dumps({"step": 31, **row, "loss": 0.1}) + "\n")
    grown = own.job("kept-parts")
    assert grown.metrics is not first.metrics and grown.metrics.steps[-1] == 31 and grown.metrics.loss[-1] == 0.1
    assert grown.samples == []
    samples = run_dir / "samples"
    samples.mkdir()
    Image.new("RGB", (8, 8)).save(samples / "step000031_p0.png")
    (samples / "index.jsonl").write_text(
        json.dumps({"step": 31, "prompt_index": 0, "prompt": "xyz_shape, a circle", "file": "step000031_p0.png"}) + "\n"
    )
    sampled = own.job("kept-parts")
    assert [(cell.step, cell.filename) for cell in sampled.samples] == [(31, "step000031_p0.png")]
    assert sampled.metrics is grown.metrics  # metrics.jsonl did not change


def test_the_parts_cache_keeps_the_jobs_used_last():
    cache = PartsCache(2)
    built = []

    def part(job_id: str, key: int) -> str:
        return cache.get(job_id, "metrics", key, lambda: built.append((job_id, key)) or f"{job_id}@{key}")

    assert [part("a", 1), part("b", 1), part("a", 1)] == ["a@1", "b@1", "a@1"]
    part("c", 1)  # a third job: b, used longest ago, goes
    assert [part("a", 1), part("b", 1)] == ["a@1", "b@1"]
    assert part("a", 2) == "a@2"  # a new key: built again
    assert built == [("a", 1), ("b", 1), ("c", 1), ("b", 1), ("a", 2)]
