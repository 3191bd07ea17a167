"""generate-captions as a background job: the child's run directory, stop and continue, the job table."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from server.captions import INLINE_MODEL_IMAGES, caption_job_started, plan_captions, runs_in_background
from server.jobs import JobService
from training.captioning import BATCH, CaptionJob, run_caption_job
from training.data.synthetic import make_shape_dataset
from training.jobs.store import JobRecord


def uncaptioned(folder: Path, count: int) -> Path:
    make_shape_dataset(folder, count)
    for caption in folder.glob("*.txt"):
        caption.unlink()
    return folder


def job_dir(tmp_path: Path, folder: Path, caption_model: str = "template") -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job = CaptionJob(
        folder=str(folder),
        files=sorted(p.name for p in folder.glob("*.png")),
        caption_model=caption_model,
        trigger_word="xyz_shape",
    )
    (run_dir / "request.json").write_text(job.model_dump_json())
    return run_dir


def plan_for(workspace: Path, caption_model: str, **options):
    values = dict(dataset_name="d", dataset_path=None, trigger_word=None, overwrite=False, prefix="", suffix="")
    return plan_captions(workspace, caption_model=caption_model, **{**values, **options})


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "captions.jsonl").read_text().splitlines()]


def test_a_stopped_job_continues_with_the_images_not_yet_captioned(tmp_path):
    folder = uncaptioned(tmp_path / "d", BATCH + 3)
    run_dir = job_dir(tmp_path, folder)
    stop = threading.Event()
    stop.set()  # as if SIGTERM came during the first batch
    assert run_caption_job(run_dir, stop) == "stopped"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == BATCH and status["total_steps"] == BATCH + 3
    assert len(list(folder.glob("*.txt"))) == BATCH

    first = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.txt")}
    assert run_caption_job(run_dir, threading.Event()) == "completed"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == BATCH + 3
    assert sorted(row["file"] for row in rows(run_dir)) == sorted(p.name for p in folder.glob("*.png"))
    assert all(folder.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in first.items())  # not redone
    assert all(p.read_text().startswith("xyz_shape shape") for p in folder.glob("*.txt"))
    log = (run_dir / "train.log").read_text()
    assert "stopped at 8 of 11" in log and "shape_010.png: xyz_shape shape" in log


def test_an_unreadable_image_is_skipped_and_reported(tmp_path):
    folder = uncaptioned(tmp_path / "d", 2)
    (folder / "shape_001.png").write_bytes(b"<svg xmlns='http://www.w3.org/2000/svg'/>")
    run_dir = job_dir(tmp_path, folder)
    assert run_caption_job(run_dir, threading.Event()) == "completed"
    assert [row.get("skipped", "")[:24] for row in rows(run_dir)] == ["", "not a readable image: ca"]
    assert (folder / "shape_000.txt").is_file() and not (folder / "shape_001.txt").exists()
    assert "shape_001.png skipped" in (run_dir / "train.log").read_text()


def test_a_truncated_image_is_skipped_not_fatal_to_its_batch(tmp_path):
    folder = uncaptioned(tmp_path / "d", 2)
    whole = (folder / "shape_001.png").read_bytes()
    (folder / "shape_001.png").write_bytes(whole[: len(whole) // 2])
    run_dir = job_dir(tmp_path, folder)
    assert run_caption_job(run_dir, threading.Event()) == "completed"
    assert (folder / "shape_000.txt").is_file() and not (folder / "shape_001.txt").exists()
    assert "not a readable image" in rows(run_dir)[1]["skipped"]


def test_a_model_that_cannot_load_fails_the_job_with_the_reason(tmp_path):
    folder = uncaptioned(tmp_path / "d", 1)
    (tmp_path / "not-a-model").mkdir()
    run_dir = job_dir(tmp_path, folder, caption_model=str(tmp_path / "not-a-model"))
    assert run_caption_job(run_dir, threading.Event()) == "failed"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "is not an image-to-text model" in status["error"]
    assert not list(folder.glob("*.txt"))


def test_a_model_on_a_long_set_goes_to_the_background(tmp_path, tiny_git):
    folder = uncaptioned(tmp_path / "datasets" / "d", INLINE_MODEL_IMAGES + 1)
    model = str(tiny_git)
    assert runs_in_background(plan_for(tmp_path, model), None)
    assert not runs_in_background(plan_for(tmp_path, "template"), None)  # the template is quick whatever the count
    assert runs_in_background(plan_for(tmp_path, "template"), True)
    assert not runs_in_background(plan_for(tmp_path, model), False)
    (folder / "shape_000.png").unlink()
    assert not runs_in_background(plan_for(tmp_path, model), None)  # INLINE_MODEL_IMAGES images: answered directly
    for image in folder.glob("*.png"):
        image.with_suffix(".txt").write_text("done")
    assert not runs_in_background(plan_for(tmp_path, model), True)  # nothing to caption: nothing to start


@pytest.fixture
def service(tmp_path) -> JobService:
    return JobService(tmp_path, stop_timeout=30)


def wait_for_final(service: JobService, job_id: str, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = service.status(job_id)
        if status.state not in ("queued", "running"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end: {service.logs(job_id, 30)}")


def test_a_captioning_job_runs_as_a_child_process_in_the_job_table(service, tmp_path, tiny_git):
    uncaptioned(tmp_path / "datasets" / "d", 3)
    plan = plan_for(tmp_path, str(tiny_git), trigger_word="xyz_shape", prefix="photo of")
    record = service.start_captioning(plan.label, json.dumps(plan.job))
    assert record.kind == "captioning" and record.state == "running" and record.pid
    assert caption_job_started(plan, "tiny", record.job_id).job_id == record.job_id
    with pytest.raises(Exception, match="already has captioning job"):
        service.start_captioning(plan.label, json.dumps(plan.job))

    status = wait_for_final(service, record.job_id)
    assert status.state == "completed", service.logs(record.job_id, 30)
    assert status.kind == "captioning" and status.config_name == "d" and status.step == status.total_steps == 3
    captions = sorted((tmp_path / "datasets" / "d").glob("*.txt"))
    assert len(captions) == 3 and all(p.read_text().startswith("xyz_shape photo of") for p in captions)
    assert "shape_002.png: xyz_shape photo of" in service.logs(record.job_id, 10)
    assert [job.kind for job in service.list()] == ["captioning"]


def a_training_job_is_running(service: JobService, run_dir: Path) -> None:
    """A training job in the table that is being spawned: within the start-up grace, so it keeps its slot."""
    now = time.time()
    record = JobRecord(
        job_id="training-now", config_name="c", state="running", run_dir=str(run_dir), created_at=now, started_at=now
    )
    service.store.insert(record)


def test_captioning_does_not_wait_behind_training(service, tmp_path):
    """One job of each kind runs at a time: a training job in progress does not hold up captioning."""
    a_training_job_is_running(service, tmp_path)
    folder = uncaptioned(tmp_path / "datasets" / "d", 2)
    plan = plan_for(tmp_path, "template")
    record = service.start_captioning(plan.label, json.dumps(plan.job))
    assert record.state == "running"
    assert wait_for_final(service, record.job_id).state == "completed"
    assert len(list(folder.glob("*.txt"))) == 2
    assert service.status("training-now").state == "running"


def test_a_job_table_from_before_captioning_jobs_is_migrated(tmp_path):
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute(
        "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, config_name TEXT NOT NULL, state TEXT NOT NULL, "
        "run_dir TEXT NOT NULL, pid INTEGER, resume INTEGER NOT NULL DEFAULT 0, stop_requested_at REAL, "
        "created_at REAL NOT NULL, started_at REAL, finished_at REAL, error TEXT)"
    )
    db.execute("INSERT INTO jobs VALUES ('old', 'c', 'completed', ?, NULL, 0, NULL, 1.0, 1.0, 2.0, NULL)", (".",))
    db.commit()
    db.close()
    service = JobService(tmp_path)
    assert service.store.get("old").kind == "training"
    assert service.list()[0].kind == "training"


def test_stop_training_stops_a_captioning_job_and_resume_finishes_it(service, tmp_path, tiny_git):
    folder = uncaptioned(tmp_path / "datasets" / "d", 3 * BATCH)
    plan = plan_for(tmp_path, str(tiny_git), trigger_word="xyz_shape")
    record = service.start_captioning(plan.label, json.dumps(plan.job))
    service.stop(record.job_id)  # while the child is still loading torch and the model
    stopped = wait_for_final(service, record.job_id)
    assert stopped.state == "stopped"
    assert len(list(folder.glob("*.txt"))) < 3 * BATCH

    service.resume(record.job_id)
    finished = wait_for_final(service, record.job_id)
    assert finished.state == "completed", service.logs(record.job_id, 30)
    assert finished.step == 3 * BATCH and len(list(folder.glob("*.txt"))) == 3 * BATCH


def test_a_generation_job_waits_for_the_training_job_on_the_gpu(service, tmp_path):
    a_training_job_is_running(service, tmp_path)
    record = service.start_generation("base", json.dumps({"model_name": "builtin:tiny-sd15", "prompt": "p"}))
    assert record.state == "queued"  # both want the GPU
    service.stop(record.job_id)
