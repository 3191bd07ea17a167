"""evaluate-lora end to end through the SDK's real stdio client: a training job's LoRA, one of its checkpoints
and a LoRA file from no run here, each scored by a real evaluation job (the tiny SD 1.x model, the built-in tiny
CLIP and DINOv2 scorers), its verdicts in the job's status and its report and grid as resources keyed by the
training job evaluated; and what it refuses before any job exists."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError
from PIL import Image
from test_mcp_server import run_session, wait_for_state

from server.jobs import JobService
from training.jobs.store import JobRecord

TINY_SCORERS = {"clip_model": "builtin:tiny-clip", "dino_model": "builtin:tiny-dinov2"}
SMALL = {"seeds": [1, 2], "strengths": [1.0], **TINY_SCORERS}  # 0 is added: the base and full strength


@dataclass
class Trained:
    workspace: Path
    job_id: str
    run_dir: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, finished_training) -> Trained:
    """A workspace of its own holding a copy of `finished_training`'s run (4 steps, one test prompt and so a
    control prompt, a checkpoint at step 2, sampled at 2 denoising steps, as an evaluation then renders): the
    evaluations write into the run's folder, which the session's other tests read untouched. Its dataset stays
    where the finished run trained on it."""
    root = tmp_path_factory.mktemp("evaluation") / "ws"
    root.mkdir()
    (root / "models").symlink_to(finished_training.workspace / "models")  # the session's built-in models
    source = JobService(finished_training.workspace).training_status(finished_training.job_id)
    assert source.state == "completed"
    run_dir = root / "runs" / finished_training.job_id
    shutil.copytree(source.run_dir, run_dir)
    now = time.time()
    record = JobRecord(
        job_id=finished_training.job_id,
        config_name=source.config_name,
        state="completed",
        run_dir=str(run_dir),
        created_at=now,
        started_at=now,
        finished_at=now,
    )
    JobService(root).store.insert(record)
    return Trained(root, finished_training.job_id, run_dir)


@pytest.fixture(scope="module")
def foreign_lora(trained) -> Path:
    """The job's LoRA as an exported file `foreign` that no run here made: its run's name taken out of its
    metadata (its training_config, with the base model and trigger word, stays)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from training.run_files import RUN_KEY

    final = next(trained.run_dir.glob("*.safetensors"))
    with safe_open(str(final), "pt") as opened:
        metadata = {key: value for key, value in opened.metadata().items() if key != RUN_KEY}
        tensors = {key: opened.get_tensor(key) for key in opened.keys()}  # noqa: SIM118 (a handle, not a dict)
    path = trained.workspace / "loras" / "foreign.safetensors"
    path.parent.mkdir(exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


async def evaluated(session, arguments: dict) -> tuple[dict, dict]:
    """Start evaluate-lora, wait for its job, and return what the tool said and the job's final status."""
    started = await session.call_tool("evaluate-lora", arguments)
    assert not started.is_error, started.content
    result = started.structured_content
    status = await wait_for_state(session, result["job_id"], ("completed", "failed", "stopped", "interrupted"), 600)
    assert status["state"] == "completed" and status["kind"] == "evaluation", status
    return result, status


async def report_of(session, job_id: str) -> dict:
    return json.loads((await session.read_resource(f"lora://jobs/{job_id}/evaluation")).contents[0].text)


def test_a_jobs_lora_is_scored_by_a_background_job_and_read_by_the_training_jobs_id(trained):
    job_id = trained.job_id

    async def script(session):
        with pytest.raises(MCPError) as missing:  # nothing evaluated yet: the resource says how to get it
            await session.read_resource(f"lora://jobs/{job_id}/evaluation")
        assert f"evaluate-lora job_id={job_id}" in str(missing.value)

        result, status = await evaluated(session, {"job_id": job_id, **SMALL})
        assert result["evaluated_job"] == job_id and result["likeness"] is True
        # the run's test prompt, and its control prompt: the same without the trigger word
        assert (result["prompts"], result["control_prompt"]) == (["xyz_shape a red circle"], "a red circle")
        assert result["lora"].endswith(".safetensors") and Path(result["lora"]).parent == trained.run_dir
        assert status["config_name"] == job_id and status["verdicts"], status
        assert all(isinstance(verdict, str) and verdict for verdict in status["verdicts"])

        report = await report_of(session, job_id)
        by_evaluation_job = await report_of(session, result["job_id"])
        grid = (await session.read_resource(f"lora://jobs/{job_id}/evaluation-grid")).contents[0]
        return result, status, report, by_evaluation_job, grid

    result, status, report, by_evaluation_job, grid = run_session(trained.workspace, script)
    assert report == by_evaluation_job  # keyed by the training job, and found by the evaluation job too
    assert (report["job_id"], report["step"], report["trigger_word"]) == (job_id, None, "xyz_shape")
    assert [row["strength"] for row in report["rows"]] == [0.0, 1.0] and report["seeds"] == [1, 2]
    assert report["verdicts"] == status["verdicts"]
    assert report["rows"][0]["control_shift"] == pytest.approx(0.0, abs=1e-6)  # the base against itself
    assert (trained.run_dir / "evaluation.json").is_file() and (trained.run_dir / report["grid"]).is_file()
    with Image.open(io.BytesIO(base64.b64decode(grid.blob))) as drawn:
        assert (grid.mime_type, drawn.format) == ("image/jpeg", "JPEG")


def test_a_checkpoint_and_a_file_from_no_run_here_report_apart(trained, foreign_lora):
    """A checkpoint's evaluation goes beside the final LoRA's under its own name; a LoRA file no run here made
    is reported in the evaluation job's own folder."""

    async def script(session):
        checkpoint, _ = await evaluated(session, {"job_id": trained.job_id, "step": 2, **SMALL})
        by_training_job = json.loads(
            (await session.read_resource(f"lora://jobs/{trained.job_id}/evaluation-step2")).contents[0].text
        )
        grid = await session.read_resource(f"lora://jobs/{trained.job_id}/evaluation-grid-step2")
        with pytest.raises(MCPError) as not_evaluated:  # the step-4 LoRA's checkpoint was not evaluated
            await session.read_resource(f"lora://jobs/{trained.job_id}/evaluation-step4")
        foreign, _ = await evaluated(session, {"lora": "foreign", "prompts": ["xyz_shape a blue square"], **SMALL})
        return (
            checkpoint,
            await report_of(session, checkpoint["job_id"]),
            by_training_job,
            (grid.contents[0], str(not_evaluated.value)),
            foreign,
            await report_of(session, foreign["job_id"]),
            await session.call_tool("get-training-status", {"job_id": foreign["job_id"]}),
        )

    checkpoint, checkpoint_report, by_training_job, (grid, not_evaluated), foreign, foreign_report, foreign_status = (
        run_session(trained.workspace, script)
    )
    assert checkpoint["evaluated_job"] == trained.job_id and "checkpoints" in checkpoint["lora"]
    # keyed by the training job and the step, like the final LoRA's evaluation
    assert f"lora://jobs/{trained.job_id}/evaluation-step2 has every score" in checkpoint["next_step"]
    assert f"lora://jobs/{trained.job_id}/evaluation-grid-step2" in checkpoint["next_step"]
    assert (checkpoint_report["job_id"], checkpoint_report["step"]) == (trained.job_id, 2)
    assert by_training_job == checkpoint_report  # the same report, by the evaluation job's id or the training job's
    assert (trained.run_dir / "evaluation-step2.json").is_file()
    assert (trained.run_dir / checkpoint_report["grid"]).read_bytes() == base64.b64decode(grid.blob)
    assert f"evaluate-lora job_id={trained.job_id} step=4" in not_evaluated

    assert foreign["evaluated_job"] is None and foreign["likeness"] is False  # no training images known
    assert foreign["model_name"] == "builtin:tiny-sd15"  # from the file's own training_config
    assert foreign["control_prompt"] == "a blue square"  # the trigger word the file records, taken out
    assert foreign["prompts"] == ["xyz_shape a blue square"]
    assert foreign_report["job_id"] is None and foreign_report["lora"] == str(foreign_lora)
    assert foreign_report["rows"][-1]["likeness_dino_mean"] is None
    own_folder = Path(foreign_status.structured_content["run_dir"])
    assert own_folder != trained.run_dir and (own_folder / "evaluation.json").is_file()


def test_what_cannot_be_scored_is_refused_before_a_job_exists(trained, lora_bytes):
    runs = trained.workspace / "runs"
    (trained.workspace / "loras").mkdir(exist_ok=True)
    (trained.workspace / "loras" / "made.safetensors").write_bytes(lora_bytes)  # made elsewhere: no training_config

    async def script(session):
        refusals = {}
        for name, arguments in {
            "both": {"job_id": trained.job_id, "lora": "x"},
            "neither": {},
            "step alone": {"lora": "x", "step": 2},
            "unknown job": {"job_id": "no-such-job"},
            "no checkpoint": {"job_id": trained.job_id, "step": 3},
            "no lora": {"lora": "not-exported"},
            "no base model": {"lora": "made", "prompts": ["a"]},
            "no prompts": {"lora": "made", "model_name": "builtin:tiny-sd15"},
            "no model": {"lora": "made", "prompts": ["a"], "model_name": "builtin:no-such-model"},
            "bad strength": {"job_id": trained.job_id, "strengths": [5]},
            # the server runs offline (HF_HUB_OFFLINE) and these hub ids are in no cache
            "no clip": {"job_id": trained.job_id, "clip_model": "no-such-org/no-such-clip"},
            "no dino": {"job_id": trained.job_id, **TINY_SCORERS, "dino_model": "no-such-org/no-such-dinov2"},
        }.items():
            result = await session.call_tool("evaluate-lora", arguments)
            assert result.is_error, (name, result.content)
            refusals[name] = result.content[0].text
        with pytest.raises(MCPError) as unknown:
            await session.read_resource("lora://jobs/no-such-job/evaluation")
        return refusals, str(unknown.value)

    before = sorted(runs.iterdir())
    refusals, unknown = run_session(trained.workspace, script)
    assert sorted(runs.iterdir()) == before  # no job, no folder
    assert all("job_id" in refusals[name] and "lora" in refusals[name] for name in ("both", "neither"))
    assert "give job_id with it" in refusals["step alone"]
    assert "no job 'no-such-job'" in refusals["unknown job"] and "no-such-job" in unknown
    assert "no checkpoint at step 3" in refusals["no checkpoint"] and "step000002" in refusals["no checkpoint"]
    assert "list-exported-models" in refusals["no lora"]
    assert "give model_name" in refusals["no base model"] and "model_name" in refusals["no model"]
    assert "give prompts" in refusals["no prompts"]
    assert "between -2 and 2" in refusals["bad strength"]
    # each scorer model is checked before any job starts
    for name, role, field, model in (
        ("no clip", "CLIP", "clip_model", "no-such-org/no-such-clip"),
        ("no dino", "DINOv2", "dino_model", "no-such-org/no-such-dinov2"),
    ):
        assert f"the {role} model '{model}' is neither a folder here nor in this machine's" in refusals[name]
        assert f"download-base-model model_name={model}" in refusals[name], refusals[name]
        assert "evaluate again once it is completed" in refusals[name]
        assert f"give {field} a local folder" in refusals[name]
