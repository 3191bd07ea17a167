"""TrainingService: the rules of a training run that every front end shares, on a temporary workspace.
Finished jobs are written into the job table and their run directories by hand, so no trainer runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from server.configs import ConfigService
from server.errors import ServiceError
from server.jobs import JobService
from server.training_runs import TrainingService
from training.jobs.store import JobRecord


@pytest.fixture
def workspace(tmp_path) -> Path:
    return tmp_path / "ws"


@pytest.fixture
def service(workspace) -> TrainingService:
    return TrainingService(ConfigService(workspace), JobService(workspace))


def finished_job(service: TrainingService, workspace: Path, job_id: str = "done") -> Path:
    run_dir = workspace / "runs" / job_id
    run_dir.mkdir(parents=True)
    record = JobRecord(
        job_id=job_id, config_name="cfg", state="completed", run_dir=str(run_dir), created_at=time.time()
    )
    service.jobs.store.insert(record)
    return run_dir


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_an_invalid_config_is_refused_before_a_job_exists(service, workspace):
    service.configs.create(
        {"name": "nodata", "model_name": "builtin:tiny-sd15", "dataset_path": str(workspace / "missing")}
    )
    with pytest.raises(ServiceError, match="config 'nodata' cannot train: .*dataset.*update-training-config"):
        service.start("nodata")
    assert service.jobs.list() == []
    assert not (workspace / "runs").exists()


def test_metrics_csv_puts_the_validation_loss_beside_its_step(service, workspace):
    run_dir = finished_job(service, workspace)
    write_jsonl(
        run_dir / "metrics.jsonl",
        [
            {"step": 1, "loss": 0.5, "lr": 2e-4, "grad_norm": None, "step_time": 0.1, "time": 1.0},
            {"step": 2, "loss": 0.25, "lr": 2e-4, "grad_norm": 1.5, "step_time": 0.1, "time": 2.0},
            {"kind": "validation", "step": 2, "loss": 0.3},
        ],
    )
    assert service.metrics_csv("done").splitlines() == [
        "step,loss,lr,grad_norm,step_time,time,validation_loss",
        "1,0.5,0.0002,,0.1,1.0,",
        "2,0.25,0.0002,1.5,0.1,2.0,0.3",
    ]


def test_samples_default_to_the_latest_step_and_name_the_control_prompt(service, workspace):
    run_dir = finished_job(service, workspace)
    write_jsonl(
        run_dir / "samples" / "index.jsonl",
        [
            {"step": 0, "prompt_index": 0, "prompt": "xyz a cat", "file": "s0_p0.png"},
            {"step": 5, "prompt_index": 0, "prompt": "xyz a cat", "file": "s5_p0.png"},
            {"step": 5, "prompt_index": 1, "prompt": "a cat", "file": "s5_p1.png", "control": True},
        ],
    )
    latest = service.samples("done", None)
    assert [sample.path.name for sample in latest] == ["s5_p0.png", "s5_p1.png"]
    assert latest[0].caption == "step 5, prompt 0: xyz a cat"
    assert "control prompt" in latest[1].caption
    assert [sample.path.name for sample in service.samples("done", 0)] == ["s0_p0.png"]
    with pytest.raises(ServiceError, match=r"samples at steps \[0, 5\]"):
        service.samples("done", 3)


def test_a_job_without_samples_says_why(service, workspace):
    finished_job(service, workspace)
    with pytest.raises(ServiceError, match="no samples yet"):
        service.samples("done", None)


@pytest.mark.parametrize("filename", ["../state.db", ".hidden.png", "a/b.png", "missing.png", "notes.txt"])
def test_only_a_sample_png_of_the_job_is_served(service, workspace, filename):
    run_dir = finished_job(service, workspace)
    (run_dir / "samples").mkdir()
    (run_dir / "samples" / "s0_p0.png").write_bytes(b"png")
    (run_dir / "samples" / ".hidden.png").write_bytes(b"png")
    (run_dir / "samples" / "notes.txt").write_text("x")
    assert service.sample_path("done", "s0_p0.png").read_bytes() == b"png"
    with pytest.raises(ServiceError, match="has no sample"):
        service.sample_path("done", filename)
