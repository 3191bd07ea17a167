"""The job service without MCP: queue, child processes, stop/resume, restarts and kills."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import pytest
from conftest import fast_config, wait_until

from server.errors import ServiceError
from server.jobs import JobService


def done(status) -> bool:
    return status.state in ("completed", "failed", "stopped", "interrupted")


@pytest.fixture
def service(tmp_path, tiny_sd15) -> JobService:
    # The workspace shares the session's built-in models, so children do not rebuild them.
    (tmp_path / "models").symlink_to(tiny_sd15.parent)
    return JobService(tmp_path, stop_timeout=30)


def yaml_for(dataset: Path, **options) -> str:
    return fast_config(dataset, **options).to_yaml()


def test_a_job_runs_to_completion_and_its_state_is_durable(service, shapes, tmp_path):
    job = service.start("first", yaml_for(shapes, steps=3))
    assert job.state == "running" and job.pid
    status = wait_until(service, job.job_id, done)
    assert status.state == "completed", service.logs(job.job_id, 30)
    assert status.step == status.total_steps == 3 and status.percent == 100.0
    assert Path(status.lora_path).is_file()
    assert "step 3/3" in service.logs(job.job_id, 5)

    row = sqlite3.connect(tmp_path / "state.db").execute("SELECT state FROM jobs WHERE job_id = ?", (job.job_id,))
    assert row.fetchone() == ("completed",)
    assert JobService(tmp_path).status(job.job_id).state == "completed"  # a new server sees the same


def test_a_second_job_waits_and_starts_by_itself(service, shapes):
    first = service.start("one", yaml_for(shapes, steps=3))
    second = service.start("two", yaml_for(shapes, steps=2))
    assert (first.state, second.state) == ("running", "queued")
    wait_until(service, first.job_id, done)
    status = wait_until(service, second.job_id, done)
    assert status.state == "completed"
    assert status.started_at >= service.status(first.job_id).finished_at - 1.0


def test_starting_a_config_twice_is_refused(service, shapes):
    job = service.start("twice", yaml_for(shapes, steps=2))
    with pytest.raises(ServiceError, match="already has training job"):
        service.start("twice", yaml_for(shapes, steps=2))
    wait_until(service, job.job_id, done)


def test_stop_then_resume_completes(service, shapes):
    job = service.start("long", yaml_for(shapes, steps=100000, batch_size=1))
    wait_until(service, job.job_id, lambda s: s.step >= 2)
    service.stop(job.job_id)
    stopped = wait_until(service, job.job_id, done)
    assert stopped.state == "stopped" and stopped.last_checkpoint
    with pytest.raises(ServiceError, match="already stopped"):
        service.stop(job.job_id)

    run = Path(stopped.run_dir)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("rank: 4", "rank: 8"))
    with pytest.raises(ServiceError, match=r"cannot resume: rank is 8 but checkpoint step0+\d+ was trained with 4"):
        service.resume(job.job_id)  # refused before it queues: the checkpoint's LoRA has rank 4's shapes
    assert service.status(job.job_id).state == "stopped"  # still resumable once the rank is back

    (run / "config.yaml").write_text(config.replace("steps: 100000", f"steps: {stopped.step + 2}"))
    resumed = service.resume(job.job_id)
    assert resumed.job_id == job.job_id and resumed.state == "running"
    final = wait_until(service, job.job_id, done)
    assert final.state == "completed" and final.step == stopped.step + 2


def test_a_killed_trainer_is_interrupted_and_resumes(service, shapes):
    job = service.start("killed", yaml_for(shapes, steps=100000, batch_size=1, save_every=2))
    wait_until(service, job.job_id, lambda s: s.last_checkpoint is not None)
    os.killpg(service.store.get(job.job_id).pid, signal.SIGKILL)
    status = wait_until(service, job.job_id, done)
    assert status.state == "interrupted" and "resume-training" in status.error

    run = Path(status.run_dir)
    # The newest checkpoint on disk: status.json (rewritten every 2 s) may not name the last one yet.
    checkpoint_step = max(
        int(p.name.removeprefix("step")) for p in (Path(status.run_dir) / "checkpoints").glob("step*")
    )
    config = (run / "config.yaml").read_text().replace("steps: 100000", f"steps: {checkpoint_step + 1}")
    (run / "config.yaml").write_text(config)
    service.resume(job.job_id)
    assert wait_until(service, job.job_id, done).state == "completed"


def test_a_restarted_server_reattaches_to_a_running_job(service, shapes, tmp_path):
    job = service.start("survivor", yaml_for(shapes, steps=40, batch_size=1))
    wait_until(service, job.job_id, lambda s: s.step >= 1)
    restarted = JobService(tmp_path)  # a new server process would start exactly like this
    assert restarted.status(job.job_id).state == "running"
    assert wait_until(restarted, job.job_id, done).state == "completed"
    service.refresh()  # the old instance reaps its child and agrees
    assert service.status(job.job_id).state == "completed"


def test_a_failing_run_reports_the_trainers_reason(service, tmp_path):
    job = service.start("nodata", yaml_for(tmp_path / "missing", steps=2))
    status = wait_until(service, job.job_id, done)
    assert status.state == "failed" and "dataset" in status.error


def test_bad_ids_and_states(service, shapes):
    for bad in ("../x", "a/b", "/etc", "", "nope"):
        with pytest.raises(ServiceError):
            service.status(bad)
    queued_behind = service.start("runner", yaml_for(shapes, steps=2))
    waiting = service.start("waiter", yaml_for(shapes, steps=2))
    assert service.stop(waiting.job_id).state == "stopped"  # a queued job stops without running
    with pytest.raises(ServiceError, match="only a stopped, interrupted or failed"):
        service.resume(queued_behind.job_id)
    wait_until(service, queued_behind.job_id, done)
    assert not (Path(waiting.run_dir) / "status.json").exists()
    assert json.loads((Path(queued_behind.run_dir) / "status.json").read_text())["state"] == "completed"


def test_a_reused_pid_is_not_mistaken_for_the_trainer(service, shapes, tmp_path):
    """After a reboot the recorded pid may belong to another program: the job is interrupted."""
    job = service.start("ghost", yaml_for(shapes, steps=2))
    wait_until(service, job.job_id, done)
    # Pretend the job was running under a pid that is now an unrelated process (this test's own).
    service.store.update(job.job_id, state="running", pid=os.getpid(), finished_at=None)
    restarted = JobService(tmp_path)
    status = restarted.status(job.job_id)
    assert status.state == "completed"  # the trainer had finished: its final state stands
    service.store.update(job.job_id, state="running", pid=os.getpid(), finished_at=None)
    (Path(status.run_dir) / "status.json").write_text(json.dumps({"state": "running", "heartbeat": 0}))
    assert restarted.status(job.job_id).state == "interrupted"
