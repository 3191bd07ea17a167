"""resume-training with apply_fix (issue 17): a job that ran out of memory continues from the checkpoint it saved,
with the out-of-memory finding's patch, through the real stdio client and the real `lora-train --resume` child."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml
from test_mcp_server import run_session, wait_for_state

from server.errors import ServiceError, WorkspaceStateError
from server.jobs import JobService
from server.resume_fix import _check_fix_resumable, resume_job
from training.jobs.store import JobRecord


@pytest.fixture
def workspace_with_oom_job(tmp_path, tiny_sd15, oom_run) -> tuple[Path, str]:
    """A workspace whose job `oom-job` is a copy of the session's `oom_run` (failed out of memory at step 4, with
    checkpoint step000003), recorded in its job table as the job's own process would have left it."""
    root = tmp_path / "ws"
    root.mkdir()
    (root / "models").symlink_to(tiny_sd15.parent)  # the session's built-in models
    job_id = "oom-job"
    run_dir = root / "runs" / job_id
    shutil.copytree(oom_run.run_dir, run_dir)  # the resume changes the run: the session's stays as it was
    assert oom_run.result.state == "failed" and "out of memory" in oom_run.result.error
    now = time.time()
    record = JobRecord(
        job_id=job_id,
        config_name="oom",
        state="failed",
        run_dir=str(run_dir),
        created_at=now,
        started_at=now,
        finished_at=now,
        error=oom_run.result.error,
    )
    JobService(root).store.insert(record)
    return root, job_id


def test_a_refused_resume_leaves_the_runs_config_as_it_was(workspace_with_oom_job):
    """JobService refuses the resume (here: the checkpoint was trained at another rank than the run's config says):
    the fix is not written, so the run can be resumed later with the same finding."""
    root, job_id = workspace_with_oom_job
    run_dir = root / "runs" / job_id
    saved = run_dir / "checkpoints" / "step000003" / "config.yaml"
    saved.write_text(saved.read_text().replace("rank: 4", "rank: 8"))
    files = [run_dir / "config.yaml", run_dir / "request.yaml"]
    texts = [path.read_bytes() for path in files]
    with pytest.raises(ServiceError, match="cannot resume: rank is 4 but checkpoint step000003 was trained with 8"):
        resume_job(JobService(root), job_id, "out-of-memory")
    assert [path.read_bytes() for path in files] == texts
    assert JobService(root).status(job_id).state == "failed"


def test_an_out_of_memory_job_resumes_with_its_fix_over_mcp(workspace_with_oom_job):
    root, job_id = workspace_with_oom_job
    run_dir = root / "runs" / job_id

    async def script(session):
        diagnosis = await session.call_tool("diagnose-training", {"job_id": job_id})
        assert not diagnosis.is_error, diagnosis.content
        first = diagnosis.structured_content["findings"][0]
        assert first["rule"] == "out-of-memory" and first["severity"] == "error"
        assert f"resume-training job_id={job_id} apply_fix=<rule>" in diagnosis.structured_content["next_step"]

        wrong = await session.call_tool("resume-training", {"job_id": job_id, "apply_fix": "loss-spike"})
        assert wrong.is_error and "out-of-memory" in wrong.content[0].text  # the findings there are, listed
        assert (await session.call_tool("get-training-status", {"job_id": job_id})).structured_content["state"] == (
            "failed"
        )

        resumed = await session.call_tool("resume-training", {"job_id": job_id, "apply_fix": "out-of-memory"})
        assert not resumed.is_error, resumed.content
        result = resumed.structured_content
        assert result["job_id"] == job_id and result["state"] in ("queued", "running")
        assert result["applied_fix"] == "out-of-memory"
        changes = result["changes"]
        assert changes["gradient_checkpointing"] == [False, True] and changes["batch_size"] == [2, 1]
        assert changes["gradient_accumulation_steps"] == [1, 2]  # the same 2 images per optimizer step
        assert set(changes) == set(first["patch"])  # the finding's whole patch, and nothing else
        return await wait_for_state(session, job_id, ("completed", "failed", "interrupted"))

    final = run_session(root, script)
    assert final["state"] == "completed", final
    assert final["step"] == 8
    log = (run_dir / "train.log").read_text()
    assert "resumed from" in log and "at step 3" in log  # the checkpoint saved after running out of memory
    # batch 2 -> 1: the 4 images are 2 batches an epoch, then 4. The checkpoint is where the failed step 4 began
    # drawing (epoch 1, batch 1 of 2), so it continues at batch 2 of 4: the failed step's images, not the epoch again.
    rescaled = "batches of 1 image(s), 4 an epoch (the checkpoint's: 2, 2): epoch 1 continues at batch 2 instead of 1"
    assert rescaled in log and "this resume is not exact" in log
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["batch_size"] == 1 and resolved["gradient_checkpointing"] is True
    request = yaml.safe_load((run_dir / "request.yaml").read_text())
    assert request["batch_size"] == 1 and request["gradient_accumulation_steps"] == 2


def test_a_fix_a_checkpoint_cannot_continue_under_is_refused_with_the_way_that_works(tmp_path):
    with pytest.raises(WorkspaceStateError, match=r"changes rank.*apply-fix job_id=j finding_id=f"):
        _check_fix_resumable("j", tmp_path, "f", {"rank": 32, "learning_rate": 1e-4})
    checkpoint = tmp_path / "checkpoints" / "step000040"
    checkpoint.mkdir(parents=True)
    with pytest.raises(WorkspaceStateError, match="ends the run at step 30.*last checkpoint is at step 40"):
        _check_fix_resumable("j", tmp_path, "f", {"steps": 30})
    _check_fix_resumable("j", tmp_path, "f", {"steps": 60, "batch_size": 1})  # later steps, other options: fine


def test_the_fix_goes_into_request_yaml_beside_only_what_the_job_was_given(workspace_with_oom_job):
    """request.yaml keeps the job's own options (apply-fix copies it later, and must not pin every default this
    version resolves); config.yaml, the resolved config, takes the patch among all its values."""
    from server.resume_fix import _patched

    root, job_id = workspace_with_oom_job
    run_dir = root / "runs" / job_id
    full = yaml.safe_load((run_dir / "request.yaml").read_text())
    given = {key: full[key] for key in ("name", "model_name", "dataset_path", "steps", "resolution", "batch_size")}
    (run_dir / "request.yaml").write_text(yaml.safe_dump(given, sort_keys=False))
    _, after, changes = _patched(run_dir, {"batch_size": 1, "gradient_accumulation_steps": 2})
    request = yaml.safe_load(after[run_dir / "request.yaml"])
    assert request == {**given, "batch_size": 1, "gradient_accumulation_steps": 2}
    resolved = yaml.safe_load(after[run_dir / "config.yaml"])
    assert resolved["batch_size"] == 1 and set(resolved) > set(request)  # every resolved value, patched
    assert changes == {"batch_size": [2, 1], "gradient_accumulation_steps": [1, 2]}


def test_a_job_being_evaluated_is_not_deleted_under_its_evaluation(workspace_with_oom_job):
    """An evaluate-lora job of this job's checkpoint writes its report into the job's run folder: delete-job waits
    for it, and deletes once it has ended."""
    root, job_id = workspace_with_oom_job
    service = JobService(root)
    now = time.time()
    evaluation = JobRecord(
        job_id="eval-oom-1",
        kind="evaluation",
        config_name=f"{job_id} step 3",
        state="running",  # being spawned: no pid yet, so the queue leaves it as it is
        run_dir=str(root / "runs" / "eval-oom-1"),
        created_at=now,
        started_at=now,
    )
    service.store.insert(evaluation)
    with pytest.raises(WorkspaceStateError, match=f"job {job_id} is being evaluated by eval-oom-1.*stop-training it"):
        service.delete(job_id)
    assert (root / "runs" / job_id / "checkpoints" / "step000003").is_dir()
    service.store.update("eval-oom-1", state="stopped", finished_at=time.time())
    assert service.delete(job_id).run_dir_removed and not (root / "runs" / job_id).exists()
