"""The MCP server through the SDK's real client over stdio (the server is a subprocess)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from PIL import Image

from server.charts import CURVE_SIZE, grid_size

REPO = Path(__file__).resolve().parent.parent


def server_params(workspace: Path, *, allow_beside: bool = True, **env: str) -> StdioServerParameters:
    """`lora-mcp --workspace` as the SDK's client starts it, with `env` added to its environment. The tests'
    datasets live beside the workspace, in the test's temporary folder, which is then an allowed folder. Its
    children run one thread each: on the tests' 2-core machine a trainer and a renderer often run side by side,
    and the tiny models gain nothing from a second thread."""
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if "PYTHONPATH" in os.environ:  # a checkout other than the installed one: its server and jobs run its code
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    if allow_beside:
        env["LORA_MCP_ALLOWED_DIRS"] = str(workspace.parent)
    return StdioServerParameters(
        command=sys.executable, args=["-m", "server.main", "--workspace", str(workspace)], cwd=str(REPO), env=env
    )


def run_session(workspace: Path, script, **env: str):
    """Start `lora-mcp --workspace` as a subprocess (`env` added to its environment), connect, run
    `script(session)`, return its result."""

    async def main():
        params = server_params(workspace, **env)
        with open(workspace.parent / f"{workspace.name}-server.err", "a") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                return await script(session)

    return anyio.run(main)


@pytest.fixture
def server_workspace(tmp_path, tiny_sd15) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "models").symlink_to(tiny_sd15.parent)  # share the session's built-in models
    return root


async def wait_for_state(session, job_id: str, states: tuple[str, ...], timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await session.call_tool("get-training-status", {"job_id": job_id})
        assert not result.is_error, result.content
        if result.structured_content["state"] in states:
            return result.structured_content
        await anyio.sleep(0.25)
    raise AssertionError(f"job {job_id} did not reach {states}")


def test_full_flow_on_the_tiny_model(server_workspace, shapes):
    workspace = server_workspace

    async def script(session):
        names = {tool.name for tool in (await session.list_tools()).tools}
        assert {"create-training-config", "start-training", "get-training-status", "get-training-samples"} <= names

        created = await session.call_tool(
            "create-training-config",
            {
                "name": "shapes-style",
                "model_name": "builtin:tiny-sd15",
                "dataset_path": str(shapes),
                "trigger_word": "xyz_shape",
                "resolution": 64,
                "steps": 4,
                "save_every": 2,
                "rank": 4,
                "sample_prompts": ["xyz_shape a red circle"],  # the guide's alias
                "sample_every": 2,
                "sample_steps": 2,
            },
        )
        assert not created.is_error, created.content
        assert created.structured_content["config"]["test_prompts"] == ["xyz_shape a red circle"]
        assert json.loads(created.content[0].text)["name"] == "shapes-style"  # readable text next to the structure

        report = await session.call_tool("validate-training-config", {"name": "shapes-style"})
        assert report.structured_content["valid"] is True and report.structured_content["images"] == 4

        started = await session.call_tool("start-training", {"config_name": "shapes-style"})
        assert not started.is_error, started.content
        job_id = started.structured_content["job_id"]
        assert started.structured_content["state"] in ("queued", "running")

        final = await wait_for_state(session, job_id, ("completed", "failed", "interrupted"))
        assert final["state"] == "completed", final
        assert final["step"] == final["total_steps"] == 4 and final["percent"] == 100.0
        assert final["grad_norm"] > 0 and final["lr"] > 0 and final["loss"] > 0  # the guide's key metrics
        assert Path(final["lora_path"]).is_file()

        samples = await session.call_tool("get-training-samples", {"job_id": job_id})
        kinds = [item.type for item in samples.content]
        assert kinds == ["text", "image", "text", "image"]  # the test prompt and the control prompt
        assert "step 4" in samples.content[0].text
        for image in samples.content[1::2]:  # PNG or JPEG, whichever is smaller (issue 16 item 4)
            with Image.open(io.BytesIO(base64.b64decode(image.data))) as decoded:
                assert image.mime_type == f"image/{decoded.format.lower()}" and decoded.size == (64, 64)
        assert "prompt 1: a red circle (control prompt" in samples.content[2].text
        baseline = await session.call_tool("get-training-samples", {"job_id": job_id, "step": 0})
        assert "step 0" in baseline.content[0].text

        logs = await session.call_tool("get-training-logs", {"job_id": job_id, "lines": 5})
        assert "run completed" in logs.content[0].text

        jobs = await session.call_tool("list-training-jobs", {})
        assert [job["job_id"] for job in jobs.structured_content["jobs"]] == [job_id]

        # The LoRA leaves the server: exported to loras/, then downloaded in pieces.
        exported = await session.call_tool("export-model", {"job_id": job_id})
        assert not exported.is_error, exported.content
        lora = exported.structured_content
        assert lora["name"] == "shapes-style" and lora["trigger_word"] == "xyz_shape" and lora["step"] == 4
        assert Path(lora["path"]).with_suffix(".json").is_file()
        listed = await session.call_tool("list-exported-models", {})
        assert [item["name"] for item in listed.structured_content["loras"]] == ["shapes-style"]

        pieces, offset = [], 0
        while True:
            chunk = await session.call_tool(
                "download-model", {"path": "shapes-style.safetensors", "offset": offset, "length": 100_000}
            )
            pieces.append(base64.b64decode(chunk.structured_content["data"]))
            if chunk.structured_content["eof"]:
                break
            offset = chunk.structured_content["next_offset"]
        assert len(pieces) > 1 and b"".join(pieces) == Path(lora["path"]).read_bytes()
        as_diffusers = await session.call_tool(
            "export-model", {"job_id": job_id, "step": 2, "output_format": "diffusers"}
        )
        assert not as_diffusers.is_error, as_diffusers.content
        converted = as_diffusers.structured_content
        assert converted["name"] == "shapes-style-step000002" and converted["output_format"] == "diffusers"
        assert b"lora_A" in Path(converted["path"]).read_bytes()[:20000]
        run_file = await session.call_tool("download-model", {"path": f"{job_id}/status.json"})
        assert json.loads(base64.b64decode(run_file.structured_content["data"]))["state"] == "completed"

        diagnosis = await session.call_tool("diagnose-training", {"job_id": job_id})
        assert not diagnosis.is_error, diagnosis.content
        assert diagnosis.structured_content["state"] == "completed"
        recommended = diagnosis.structured_content["recommended_checkpoint"]
        assert recommended["step"] in (2, 4) and Path(recommended["path"]).is_file() and recommended["reason"]
        as_resource = await session.read_resource(f"lora://jobs/{job_id}/diagnosis")
        assert json.loads(as_resource.contents[0].text)["recommended_checkpoint"] == recommended
        for step in (2, 4):  # a checkpoint, and the last step, which is the final LoRA
            chosen = await session.call_tool("export-model", {"job_id": job_id, "step": step})
            assert not chosen.is_error, chosen.content

        # Resources
        status = await session.read_resource(f"lora://jobs/{job_id}/status")
        assert json.loads(status.contents[0].text)["state"] == "completed"
        metrics = (await session.read_resource(f"lora://jobs/{job_id}/metrics")).contents[0].text.splitlines()
        assert metrics[0].startswith("step,loss,lr") and metrics[0].endswith(",validation_loss") and len(metrics) == 5
        curve = (await session.read_resource(f"lora://jobs/{job_id}/loss-curve")).contents[0]
        with Image.open(io.BytesIO(base64.b64decode(curve.blob))) as drawn:
            assert (curve.mime_type, drawn.format, drawn.size) == ("image/png", "PNG", CURVE_SIZE)
        grid = (await session.read_resource(f"lora://jobs/{job_id}/samples-grid")).contents[0]
        with Image.open(io.BytesIO(base64.b64decode(grid.blob))) as drawn:
            # rows: the samples of steps 0, 2 and 4; columns: the test prompt and the control; 64 px samples
            assert (grid.mime_type, drawn.format, drawn.size) == ("image/jpeg", "JPEG", grid_size(2, 3, 64))
        sample = await session.read_resource(f"lora://jobs/{job_id}/samples/step000000_p0.png")
        assert base64.b64decode(sample.contents[0].blob).startswith(b"\x89PNG")
        config = await session.read_resource("lora://configs/shapes-style")
        assert "name: shapes-style" in config.contents[0].text
        log = await session.read_resource(f"lora://jobs/{job_id}/log")
        assert "run completed" in log.contents[0].text

        stats = await session.call_tool("get-system-stats", {})
        assert stats.structured_content["running_jobs"] == 0 and stats.structured_content["ram_total_gb"] > 0

    run_session(workspace, script)


def test_a_completed_jobs_lora_is_listed_under_a_name_every_tool_takes(server_workspace, shapes, lora_bytes):
    """Issue 15 item 4: the final LoRA is in list-exported-models without export-model, as the config's name,
    numbered when another job's LoRA has it; download-model takes the name as listed."""
    loras = server_workspace / "loras"
    loras.mkdir()
    (loras / "shapes-style.safetensors").write_bytes(lora_bytes)  # an earlier job's, of the same config name
    (loras / "shapes-style.json").write_text(json.dumps({"name": "shapes-style", "job_id": "job-from-before"}))

    async def script(session):
        await create(session, "shapes-style", shapes, resolution=64, steps=2, save_every=2, disable_sampling=True)
        job_id = (await start(session, "shapes-style"))["job_id"]
        final = await wait_for_state(session, job_id, ("completed", "failed", "interrupted"))
        assert final["state"] == "completed", final
        assert final["exported_lora"] == "shapes-style-2"
        listed = (await session.call_tool("list-exported-models", {})).structured_content["loras"]
        by_name = {item["name"]: item for item in listed}
        assert {name: item["job_id"] for name, item in by_name.items()} == {
            "shapes-style": "job-from-before",
            "shapes-style-2": job_id,
        }
        assert by_name["shapes-style-2"]["step"] == 2 and by_name["shapes-style-2"]["output_format"] == "kohya"
        chunk = await session.call_tool("download-model", {"path": "shapes-style-2"})  # the name as listed
        assert not chunk.is_error, chunk.content
        exported = await session.call_tool("export-model", {"job_id": job_id})  # its own file again, not a -3
        assert not exported.is_error, exported.content
        return job_id, final, chunk.structured_content, exported.structured_content

    job_id, final, chunk, exported = run_session(server_workspace, script)
    assert (loras / "shapes-style.safetensors").read_bytes() == lora_bytes  # the other job's file is untouched
    copy = loras / "shapes-style-2.safetensors"
    assert copy.read_bytes() == Path(final["lora_path"]).read_bytes()  # the run keeps its own copy
    assert base64.b64decode(chunk["data"]) == copy.read_bytes()[: chunk["length"]]
    assert exported["name"] == "shapes-style-2" and exported["job_id"] == job_id
    assert sorted(p.name for p in loras.iterdir()) == [
        "shapes-style-2.json", "shapes-style-2.safetensors", "shapes-style.json", "shapes-style.safetensors"
    ]


def test_bad_input_gets_tool_errors_and_changes_nothing(server_workspace, shapes):
    workspace = server_workspace

    async def script(session):
        def files() -> set[Path]:
            # The server's own log and the job table's SQLite files (WAL) change with every read.
            return {
                p
                for p in workspace.rglob("*")
                if "logs" not in p.parts and p.name != "models" and not p.name.startswith("state.db")
            }

        before = files()
        cases = [
            ("get-training-status", {"job_id": "no-such-job"}, "list-training-jobs"),
            ("get-training-status", {"job_id": "../etc"}, "not allowed"),
            ("get-config", {"name": "missing"}, "list-configs"),
            ("create-training-config", {"name": "../evil", "dataset_path": str(shapes)}, "not allowed"),
            ("create-training-config", {"name": "/abs", "dataset_path": str(shapes)}, "not allowed"),
            (
                "create-training-config",
                {"name": "bad", "dataset_path": str(shapes), "resolution": 30},
                "allowed: >= 64",
            ),
            ("create-training-config", {"name": "bad", "dataset_path": str(shapes), "optimizer": "adam"}, "'adamw'"),
            ("create-training-config", {"name": "outside", "dataset_path": "/etc"}, "LORA_MCP_ALLOWED_DIRS"),
            ("start-training", {"config_name": "missing"}, "list-configs"),
            ("delete-config", {"name": "a/b"}, "not allowed"),
            ("download-model", {"path": "../state.db"}, "not allowed"),
            ("download-model", {"path": "/etc/passwd"}, "not allowed"),
            ("download-model", {"path": "no-job/status.json"}, "list-training-jobs"),
            ("download-model", {"path": "missing.safetensors"}, "list-exported-models"),
            ("export-model", {"job_id": "no-job"}, "list-training-jobs"),
        ]
        for tool, arguments, expected in cases:
            result = await session.call_tool(tool, arguments)
            assert result.is_error, (tool, arguments)
            assert expected in result.content[0].text, (tool, result.content[0].text)
        assert files() == before
        assert (await session.call_tool("list-training-jobs", {})).structured_content["jobs"] == []

        created = await session.call_tool(
            "create-training-config",
            {"name": "nodata", "model_name": "builtin:tiny-sd15", "dataset_path": str(workspace / "missing")},
        )
        assert not created.is_error
        refused = await session.call_tool("start-training", {"config_name": "nodata"})
        assert refused.is_error and "dataset" in refused.content[0].text
        assert not (workspace / "runs").exists() or not any((workspace / "runs").iterdir())

        await session.call_tool(
            "create-training-config",
            {"name": "quick", "model_name": "builtin:tiny-sd15", "dataset_path": str(shapes), "steps": 2},
        )
        job = (await session.call_tool("start-training", {"config_name": "quick"})).structured_content["job_id"]
        twice = await session.call_tool("start-training", {"config_name": "quick"})
        assert twice.is_error and "already has training job" in twice.content[0].text
        await wait_for_state(session, job, ("completed", "failed"))
        finished = await session.call_tool("stop-training", {"job_id": job})
        assert finished.is_error and "already completed" in finished.content[0].text

    run_session(workspace, script)


def test_server_start_imports_no_torch():
    code = (
        "import sys; import server.app, server.main; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def server_pids(workspace: Path) -> list[int]:
    """Processes running `server.main` on this workspace (found through /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"server.main" in command and str(workspace).encode() in command and proc.name.isdigit():
            pids.append(int(proc.name))
    return pids


async def create(session, name: str, dataset: Path, **options) -> None:
    arguments = {"name": name, "model_name": "builtin:tiny-sd15", "dataset_path": str(dataset), "rank": 4}
    result = await session.call_tool("create-training-config", {**arguments, **options})
    assert not result.is_error, result.content


async def start(session, config_name: str) -> dict:
    result = await session.call_tool("start-training", {"config_name": config_name})
    assert not result.is_error, result.content
    return result.structured_content


def test_queue_stop_and_resume_over_mcp(server_workspace, shapes):
    async def script(session):
        await create(session, "long", shapes, steps=100000, batch_size=1)
        await create(session, "short", shapes, steps=2)
        long_job = await start(session, "long")
        short_job = await start(session, "short")
        assert (long_job["state"], short_job["state"]) == ("running", "queued")

        await wait_for_state(session, long_job["job_id"], ("running",))
        deadline = time.monotonic() + 120
        while (await session.call_tool("get-training-status", {"job_id": long_job["job_id"]})).structured_content[
            "step"
        ] < 2:
            assert time.monotonic() < deadline
            await anyio.sleep(0.2)
        await session.call_tool("stop-training", {"job_id": long_job["job_id"]})
        stopped = await wait_for_state(session, long_job["job_id"], ("stopped", "failed", "interrupted"))
        assert stopped["state"] == "stopped" and stopped["last_checkpoint"]

        finished = await wait_for_state(session, short_job["job_id"], ("completed", "failed"))  # started by itself
        assert finished["state"] == "completed"

        run = Path(stopped["run_dir"])  # shorten the stopped run so that its resume ends soon
        config = (run / "config.yaml").read_text().replace("steps: 100000", f"steps: {stopped['step'] + 2}")
        (run / "config.yaml").write_text(config)
        resumed = await session.call_tool("resume-training", {"job_id": long_job["job_id"]})
        assert resumed.structured_content["job_id"] == long_job["job_id"]
        final = await wait_for_state(session, long_job["job_id"], ("completed", "failed", "interrupted"))
        assert final["state"] == "completed" and final["step"] == stopped["step"] + 2

    run_session(server_workspace, script)


def test_jobs_outlive_the_server_and_a_killed_trainer_resumes(server_workspace, shapes):
    """One trainer (one process started, not two: each imports torch) outlives the server that started it and
    one killed outright, goes on training under the next, then, itself killed, is interrupted and resumes."""

    async def first_server(session):
        await create(session, "survivor", shapes, steps=100000, batch_size=1, save_every=2)
        job = await start(session, "survivor")
        await wait_for_state(session, job["job_id"], ("running",))
        return job["job_id"]

    job_id = run_session(server_workspace, first_server)  # the server exits here; training goes on

    async def killed_server(session):
        for pid in server_pids(server_workspace):
            os.kill(pid, signal.SIGKILL)  # no clean shutdown at all
        await anyio.sleep(0.5)

    try:
        run_session(server_workspace, killed_server)
    except BaseException as exc:  # the client sees its server vanish
        if not isinstance(exc, Exception | BaseExceptionGroup):
            raise
    assert server_pids(server_workspace) == []

    async def second_server(session):
        async def status() -> dict:
            return (await session.call_tool("get-training-status", {"job_id": job_id})).structured_content

        outlived = await status()
        assert outlived["state"] == "running", outlived
        deadline = time.monotonic() + 120
        while not ((now := await status())["last_checkpoint"] and now["step"] > outlived["step"]):  # it trains on
            assert time.monotonic() < deadline, now
            await anyio.sleep(0.2)
        run = Path(now["run_dir"])
        os.kill(json.loads((run / "status.json").read_text())["pid"], signal.SIGKILL)
        interrupted = await wait_for_state(session, job_id, ("interrupted", "failed", "completed", "stopped"))
        assert interrupted["state"] == "interrupted" and "resume-training" in interrupted["error"]

        # The newest checkpoint on disk: status.json (rewritten every 2 s) may not name the last one yet.
        checkpoint_step = max(int(p.name.removeprefix("step")) for p in (run / "checkpoints").glob("step*"))
        config = (run / "config.yaml").read_text().replace("steps: 100000", f"steps: {checkpoint_step + 2}")
        (run / "config.yaml").write_text(config)
        await session.call_tool("resume-training", {"job_id": job_id})
        final = await wait_for_state(session, job_id, ("completed", "failed", "interrupted"))
        assert final["state"] == "completed" and final["step"] == checkpoint_step + 2

    run_session(server_workspace, second_server)


def test_the_train_lora_prompt_guides_the_flow(server_workspace):
    async def script(session):
        prompts = {prompt.name for prompt in (await session.list_prompts()).prompts}
        assert "train-lora" in prompts
        prompt = await session.get_prompt("train-lora", {"goal": "a watercolor style"})
        text = prompt.messages[0].content.text
        assert "a watercolor style" in text
        for tool in ("create-training-config", "validate-training-config", "start-training", "get-training-status"):
            assert tool in text

    run_session(server_workspace, script)


def test_plan_validate_and_fix_a_config_over_mcp(server_workspace, shapes):
    """The troubleshooting tools that need no training: a plan from the guide, a pre-flight finding
    fixed into a new config, the troubleshoot-training prompt, and clear errors."""
    import shutil

    shutil.copytree(shapes, server_workspace / "datasets" / "shapes")

    async def script(session):
        plan = await session.call_tool(
            "recommend-training-plan",
            {"dataset_name": "shapes", "lora_type": "style", "model_name": "builtin:tiny-sd15"},
        )
        assert not plan.is_error, plan.content
        config = plan.structured_content["config"]
        assert config["steps"] == 400 and config["learning_rate"] == 2e-4 and config["rank"] == 16
        assert plan.structured_content["strengths"]["model"] == [0.6, 1.0]
        created = await session.call_tool("create-training-config", {**config, "steps": 5000})
        assert not created.is_error, created.content

        report = await session.call_tool("validate-training-config", {"name": config["name"]})
        rules = [f["rule"] for f in report.structured_content["findings"]]
        assert "steps-vs-images" in rules
        fixed = await session.call_tool("apply-fix", {"config_name": config["name"], "finding_id": "steps-vs-images"})
        assert not fixed.is_error, fixed.content
        assert fixed.structured_content["changes"] == {"steps": [5000, 400]}
        new_name = fixed.structured_content["config_name"]
        revalidated = await session.call_tool("validate-training-config", {"name": new_name})
        assert revalidated.structured_content["valid"] is True
        assert "steps-vs-images" not in [f["rule"] for f in revalidated.structured_content["findings"]]

        prompt = await session.get_prompt("troubleshoot-training", {"job_id": "some-job"})
        text = prompt.messages[0].content.text
        assert "diagnose-training job_id=some-job" in text and "apply-fix" in text

        for tool, arguments, expected in (
            ("diagnose-training", {"job_id": "no-such-job"}, "list-training-jobs"),
            ("apply-fix", {"config_name": config["name"], "finding_id": "nope"}, "has no finding 'nope'"),
            ("apply-fix", {"finding_id": "x"}, "either job_id"),
            ("compare-training-runs", {"job_ids": ["a"]}, "2 to 8"),
            ("recommend-training-plan", {"dataset_name": "../x", "lora_type": "style"}, "not allowed"),
        ):
            result = await session.call_tool(tool, arguments)
            assert result.is_error and expected in result.content[0].text, (tool, result.content)

    run_session(server_workspace, script)


def test_resume_from_a_config_name_is_checked_by_validate_over_mcp(server_workspace, shapes):
    """The guide's progressive stage 2 says resume_from: "progressive-stage1". The server's run folders are its job
    ids, <config>-<date>-<time>-<4 hex>: the name finds them, and a name that finds nothing fails validation."""
    run = server_workspace / "runs" / "progressive-stage1-20260102-090000-3fa2"
    run.mkdir(parents=True)
    (run / "progressive-stage1.safetensors").write_bytes(b"a LoRA")
    base = {"model_name": "builtin:tiny-sd15", "dataset_path": str(shapes), "resolution": 64, "steps": 2}

    async def script(session):
        for name, resume_from in (("stage2", "progressive-stage1"), ("orphan", "no-such-run")):
            values = {**base, "name": name, "resume_from": resume_from}
            created = await session.call_tool("create-training-config", values)
            assert not created.is_error, created.content
        found = (await session.call_tool("validate-training-config", {"name": "stage2"})).structured_content
        assert found["valid"] is True, found["errors"]
        missing = (await session.call_tool("validate-training-config", {"name": "orphan"})).structured_content
        assert missing["valid"] is False
        [error] = [e for e in missing["errors"] if "resume_from" in e]
        assert "'no-such-run'" in error and "start-training" in error and "remove resume_from" in error

    run_session(server_workspace, script)


def test_the_guides_advanced_config_validates_with_the_class_its_captions_name_over_mcp(server_workspace, shapes):
    """The guide's Advanced config sets prior_preservation without class_prompt or lora_type: the class comes from
    the captions when half of them name one, and validation says exactly what to add when none does."""
    import yaml

    advanced = yaml.safe_load((Path(__file__).parent.parent / "examples" / "advanced.yaml").read_text())
    people = server_workspace / "people"
    people.mkdir()
    for number, image in enumerate(sorted(shapes.glob("*.png"))[:3]):
        (people / image.name).write_bytes(image.read_bytes())
        (people / image.with_suffix(".txt").name).write_text(f"a woman, photo {number}")

    async def script(session):
        for name, dataset in (("advanced-people", people), ("advanced-shapes", shapes)):
            values = {**advanced, "name": name, "model_name": "builtin:tiny-flux", "dataset_path": str(dataset)}
            created = await session.call_tool("create-training-config", values)
            assert not created.is_error, created.content
        named = (await session.call_tool("validate-training-config", {"name": "advanced-people"})).structured_content
        assert named["valid"] is True, named["errors"]
        said = "class_prompt not set: using 'a photo of a woman': 3 of 3 captions name a woman"
        assert f"{said}; set class_prompt to choose" in named["warnings"]
        unnamed = (await session.call_tool("validate-training-config", {"name": "advanced-shapes"})).structured_content
        assert unnamed["valid"] is False
        [error] = [e for e in unnamed["errors"] if "prior_preservation" in e]
        assert "add class_prompt: 'a photo of a person'" in error and "set prior_preservation to false" in error

    run_session(server_workspace, script)


def test_upload_and_list_datasets_over_mcp(server_workspace, shapes):
    good = base64.b64encode((shapes / "shape_000.png").read_bytes()).decode()

    async def script(session):
        mixed = await session.call_tool(
            "upload-dataset",
            {
                "dataset_name": "mine",
                "images": [
                    {"filename": "a.png", "content": good, "caption": "xyz_shape a shape"},
                    {"filename": "../b.png", "content": good},
                    {"filename": "c.png", "data": "not base64!"},
                ],
            },
        )
        assert not mixed.is_error, mixed.content
        outcome = {f["filename"]: f["saved"] for f in mixed.structured_content["files"]}
        assert outcome == {"a.png": True, "../b.png": False, "c.png": False}
        assert sorted(p.name for p in (server_workspace / "datasets" / "mine").iterdir()) == ["a.png", "a.txt"]

        all_bad = await session.call_tool(
            "upload-dataset", {"dataset_name": "other", "images": [{"filename": "x.png", "content": "@@"}]}
        )
        assert all_bad.is_error and "x.png" in all_bad.content[0].text
        assert not (server_workspace / "datasets" / "other").exists()

        info = await session.call_tool(
            "get-dataset-info", {"dataset_name": "mine", "lora_type": "character", "model_name": "builtin:tiny-sd15"}
        )
        assert not info.is_error, info.content
        assert info.structured_content["images"] == 1 and info.structured_content["verdict"].startswith("too few")
        assert info.structured_content["below_native_resolution"] == []  # 64 px is the tiny model's native size
        bad_type = await session.call_tool("get-dataset-info", {"dataset_name": "mine", "lora_type": "landscape"})
        assert bad_type.is_error and "style" in bad_type.content[0].text
        report = json.loads((await session.read_resource("lora://datasets/mine")).contents[0].text)
        assert report["images"] == 1
        thumbnail = await session.read_resource("lora://datasets/mine/images/a.png")
        assert base64.b64decode(thumbnail.contents[0].blob).startswith(b"\x89PNG")

        lint = await session.call_tool("lint-captions", {"dataset_name": "mine", "model_name": "builtin:tiny-sd15"})
        assert not lint.is_error, lint.content
        # 'xyz_shape a shape': thin, and ~20 byte-level tokens is fine for the tiny tokenizer's 75
        assert [(f["file"], f["rule"]) for f in lint.structured_content["findings"]] == [("a.png", "structure")]

        listed = await session.call_tool("list-datasets", {})
        assert [(d["name"], d["images"], d["captioned"]) for d in listed.structured_content["datasets"]] == [
            ("mine", 1, 1)
        ]

    run_session(server_workspace, script)


def test_a_subscriber_is_notified_as_the_status_changes(server_workspace, shapes):
    """The default client negotiates a pre-2026 protocol: resources/subscribe, then
    notifications/resources/updated for each change of the job's status."""
    updates: list[str] = []

    async def on_message(message) -> None:
        params = getattr(message, "params", None)
        if getattr(message, "method", None) == "notifications/resources/updated":
            updates.append(str(params.uri))

    async def main():
        params = server_params(server_workspace)
        async with (
            stdio_client(params) as (read, write),
            ClientSession(read, write, message_handler=on_message) as session,
        ):
            initialized = await session.initialize()
            assert initialized.capabilities.resources.subscribe
            await create(session, "watched", shapes, steps=60, batch_size=1)  # ~3 s: heartbeats land mid-run
            job_id = (await start(session, "watched"))["job_id"]
            uri = f"lora://jobs/{job_id}/status"
            await session.subscribe_resource(uri)
            final = await wait_for_state(session, job_id, ("completed", "failed", "interrupted"))
            assert final["state"] == "completed"
            with anyio.fail_after(10):  # the monitor notices the final state within a second
                while len(updates) < 2:
                    await anyio.sleep(0.1)
            return uri

    uri = anyio.run(main)
    assert set(updates) == {uri}
    assert len(updates) >= 2  # updates while it ran and at the end


def test_a_2026_client_listens_for_status_updates(server_workspace, shapes):
    """On a 2026-07-28 connection the same updates arrive on a subscriptions/listen stream."""
    from mcp.client.subscriptions import ResourceUpdated, listen

    async def main():
        params = server_params(server_workspace)
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            session.adopt(await session.discover())
            assert session.protocol_version == "2026-07-28"
            await create(session, "listened", shapes, steps=6, batch_size=1)
            job_id = (await start(session, "listened"))["job_id"]
            uri = f"lora://jobs/{job_id}/status"
            states = []
            async with listen(session, resource_subscriptions=[uri]) as subscription:
                with anyio.fail_after(240):
                    async for event in subscription:
                        assert isinstance(event, ResourceUpdated) and event.uri == uri
                        status = json.loads((await session.read_resource(uri)).contents[0].text)
                        states.append(status["state"])
                        if status["state"] not in ("queued", "running"):
                            break
            return states

    states = anyio.run(main)
    assert states[-1] == "completed"


def test_chunked_upload_out_of_order_then_download(server_workspace, tmp_path):
    import hashlib

    import torch
    from safetensors.torch import save_file

    source = tmp_path / "big.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.randn(64, 600)}, str(source), metadata={"ss_network_dim": "64"})
    data = source.read_bytes()
    chunk_size = 32 * 1024
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    order = [*range(len(chunks))][::-1] + [1]  # backwards, and chunk 1 twice

    async def script(session):
        started = await session.call_tool(
            "upload-lora-chunked-start",
            {
                "upload_id": "0b4f3c1e-5a2d-4f61-9c7e-2d8a1f6b9e30",
                "filename": "big.safetensors",
                "total_size": len(data),
                "chunk_size": chunk_size,
                "metadata": {"trigger_words": ["xyz_big"], "base_model": "SD1.5"},
                "sha256": hashlib.sha256(data).hexdigest(),
            },
        )
        assert not started.is_error, started.content
        early = await session.call_tool(
            "upload-lora-chunked-finish", {"upload_id": "0b4f3c1e-5a2d-4f61-9c7e-2d8a1f6b9e30"}
        )
        assert early.is_error and "have not arrived yet" in early.content[0].text
        for index in order:
            sent = await session.call_tool(
                "upload-lora-chunked-append",
                {
                    "upload_id": "0b4f3c1e-5a2d-4f61-9c7e-2d8a1f6b9e30",
                    "chunk": base64.b64encode(chunks[index]).decode(),
                    "chunk_index": index,
                },
            )
            assert not sent.is_error, sent.content
        out_of_range = await session.call_tool(
            "upload-lora-chunked-append",
            {"upload_id": "0b4f3c1e-5a2d-4f61-9c7e-2d8a1f6b9e30", "chunk": "AAAA", "chunk_index": len(chunks)},
        )
        assert out_of_range.is_error
        finished = await session.call_tool(
            "upload-lora-chunked-finish", {"upload_id": "0b4f3c1e-5a2d-4f61-9c7e-2d8a1f6b9e30"}
        )
        assert not finished.is_error, finished.content
        assert finished.structured_content["trigger_words"] == ["xyz_big"]
        again = await session.call_tool(
            "upload-lora-chunked-finish", {"upload_id": "0b4f3c1e-5a2d-4f61-9c7e-2d8a1f6b9e30"}
        )
        assert again.is_error and "already finished" in again.content[0].text

        pieces, offset = [], 0
        while True:
            chunk = (
                await session.call_tool(
                    "download-model", {"path": "big.safetensors", "offset": offset, "length": 50_000}
                )
            ).structured_content
            pieces.append(base64.b64decode(chunk["data"]))
            if chunk["eof"]:
                break
            offset = chunk["next_offset"]
        return b"".join(pieces)

    assert run_session(server_workspace, script) == data
    assert (server_workspace / "loras" / "big.safetensors").read_bytes() == data


def test_import_update_captions_and_delete_over_mcp(server_workspace, tmp_path):
    from training.data.synthetic import make_shape_dataset

    source = tmp_path / "kohya"
    make_shape_dataset(source / "10_xyz_cat", 2, trigger_word=None)
    make_shape_dataset(source / "validation", 1, trigger_word=None, seed=3)
    (source / "10_xyz_cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (source / "notes.md").write_text("not part of the dataset")

    async def script(session):
        imported = await session.call_tool(
            "import-dataset", {"dataset_name": "cats", "source_path": str(source), "mode": "copy"}
        )
        assert not imported.is_error, imported.content
        outcome = {f["filename"]: f["saved"] for f in imported.structured_content["files"]}
        assert outcome["10_xyz_cat/shape_000.png"] and not outcome["10_xyz_cat/broken.png"]
        assert [(c["folder"], c["repeats"], c["images"]) for c in imported.structured_content["concepts"]] == [
            ("10_xyz_cat", 10, 2)
        ]
        outside = await session.call_tool("import-dataset", {"dataset_name": "etc", "source_path": "/etc"})
        assert outside.is_error and "LORA_MCP_ALLOWED_DIRS" in outside.content[0].text

        updated = await session.call_tool(
            "update-captions",
            {"dataset_name": "cats", "find": "centered", "replace": "off-centre", "trigger_word": "xyz_cat"},
        )
        assert not updated.is_error, updated.content
        caption = (server_workspace / "datasets" / "cats" / "10_xyz_cat" / "shape_000.txt").read_text()
        assert caption.startswith("xyz_cat ") and "off-centre" in caption
        lint = await session.call_tool("lint-captions", {"dataset_name": "cats"})
        assert [f["rule"] for f in lint.structured_content["findings"]] == []

        deleted = await session.call_tool("delete-dataset", {"dataset_name": "cats"})
        assert not deleted.is_error and not (server_workspace / "datasets" / "cats").exists()
        assert (source / "10_xyz_cat" / "shape_000.png").is_file()  # the source is untouched
        missing = await session.call_tool("delete-dataset", {"dataset_name": "cats"})
        assert missing.is_error and "list-datasets" in missing.content[0].text

    run_session(server_workspace, script)


def test_generate_captions_reports_progress_over_mcp(server_workspace, shapes):
    import shutil

    folder = server_workspace / "datasets" / "fresh"
    shutil.copytree(shapes, folder)
    for caption in folder.glob("*.txt"):
        caption.unlink()
    progress: list[tuple[float, float | None]] = []

    async def on_progress(done, total, message) -> None:
        progress.append((done, total))

    async def script(session):
        result = await session.call_tool(
            "generate-captions",
            {"dataset_name": "fresh", "caption_model": "template", "trigger_word": "xyz_shape"},
            progress_callback=on_progress,
        )
        assert not result.is_error, result.content
        assert result.structured_content["captioned"] == 4
        missing = await session.call_tool(
            "generate-captions", {"dataset_name": "fresh", "caption_model": "blip", "overwrite": True}
        )
        assert missing.is_error and "template" in missing.content[0].text

    run_session(server_workspace, script)
    assert progress and progress[-1] == (4, 4)
    assert all(p.read_text().startswith("xyz_shape shape") for p in folder.glob("*.txt"))


def test_a_long_captioning_set_runs_as_a_job_the_training_tools_watch(server_workspace, tiny_git):
    from server.captions import INLINE_MODEL_IMAGES
    from training.data.synthetic import make_shape_dataset

    folder = server_workspace / "datasets" / "many"
    make_shape_dataset(folder, INLINE_MODEL_IMAGES + 1)
    for caption in folder.glob("*.txt"):
        caption.unlink()

    async def script(session):
        arguments = {"dataset_name": "many", "caption_model": str(tiny_git), "trigger_word": "xyz_shape"}
        started = await session.call_tool("generate-captions", arguments)
        assert not started.is_error, started.content
        job_id = started.structured_content["job_id"]
        assert job_id and started.structured_content["captioned"] == 0
        again = await session.call_tool("generate-captions", arguments)
        assert again.is_error and job_id in again.content[0].text  # one captioning job per dataset at a time

        status = await wait_for_state(session, job_id, ("completed", "failed", "interrupted"))
        assert status["state"] == "completed" and status["kind"] == "captioning"
        assert status["step"] == status["total_steps"] == INLINE_MODEL_IMAGES + 1
        logs = await session.call_tool("get-training-logs", {"job_id": job_id, "lines": 5})
        assert f"shape_{INLINE_MODEL_IMAGES:03d}.png: xyz_shape" in logs.content[0].text
        listed = await session.call_tool("list-training-jobs", {})
        assert any(j["job_id"] == job_id and j["kind"] == "captioning" for j in listed.structured_content["jobs"])
        export = await session.call_tool("export-model", {"job_id": job_id})
        assert export.is_error and "captioning job" in export.content[0].text

    run_session(server_workspace, script)
    captions = list(folder.glob("*.txt"))
    assert len(captions) == INLINE_MODEL_IMAGES + 1 and all(p.read_text().startswith("xyz_shape") for p in captions)


def test_a_folder_the_client_offers_as_a_root_may_be_imported(tmp_path, tiny_sd15):
    from mcp import types

    from training.data.synthetic import make_shape_dataset

    workspace = tmp_path / "ws"
    workspace.mkdir()
    source = tmp_path / "offered"
    make_shape_dataset(source, 2, trigger_word="xyz_shape")

    async def offer_roots(context) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri=source.as_uri(), name="offered")])

    async def main(with_roots: bool):
        params = server_params(workspace, allow_beside=False)  # only the workspace and the client's roots
        callback = offer_roots if with_roots else None
        async with (
            stdio_client(params) as (read, write),
            ClientSession(read, write, list_roots_callback=callback) as session,
        ):
            await session.initialize()
            name = "offered" if with_roots else "refused"
            return await session.call_tool("import-dataset", {"dataset_name": name, "source_path": str(source)})

    without = anyio.run(main, False)
    assert without.is_error and "root" in without.content[0].text
    offered = anyio.run(main, True)
    assert not offered.is_error, offered.content
    assert offered.structured_content["imported"] == 2


def test_generate_compare_merge_and_convert_over_mcp(server_workspace, finished_training):
    """Using a LoRA from the chat: images with it (inside the call for the tiny model, or as a job),
    a strength grid, a merge and a conversion, all from an exported LoRA's name (the session's finished
    training's LoRA, copied: nothing here trains)."""
    trained = finished_training.workspace / "runs" / finished_training.job_id / "watched.safetensors"
    loras = server_workspace / "loras"
    loras.mkdir()
    (loras / "shapes.safetensors").write_bytes(trained.read_bytes())

    async def script(session):
        image = await session.call_tool(
            "generate-image",
            {"prompt": "xyz_shape a red circle", "loras": [{"lora": "shapes", "strength_model": 0.8}], "steps": 2},
        )
        assert not image.is_error, image.content
        assert [item.type for item in image.content] == ["text", "text", "image"]
        with Image.open(io.BytesIO(base64.b64decode(image.content[2].data))) as decoded:  # PNG or JPEG
            assert image.content[2].mime_type == f"image/{decoded.format.lower()}"

        grid = await session.call_tool(
            "compare-lora-strengths",
            {"lora": "shapes", "prompt": "xyz_shape a red circle", "strengths": [0, 1], "steps": 2},
        )
        assert not grid.is_error, grid.content
        assert "grid.png" in grid.content[-2].text

        job = await session.call_tool(
            "generate-image", {"prompt": "xyz_shape", "loras": [{"lora": "shapes"}], "steps": 2, "background": True}
        )
        assert not job.is_error, job.content
        job_id = job.content[0].text.split("as job ")[1].split(" ")[0]
        status = await wait_for_state(session, job_id, ("completed", "failed", "interrupted"))
        assert status["state"] == "completed" and status["kind"] == "generation", status
        samples = await session.call_tool("get-training-samples", {"job_id": job_id})
        assert [item.type for item in samples.content] == ["text", "image"]

        merged = await session.call_tool(
            "merge-loras",
            {"loras": [{"lora": "shapes", "weight": 0.5}, {"lora": "shapes", "weight": 0.5}], "output_name": "twice"},
        )
        assert not merged.is_error, merged.content
        assert Path(merged.structured_content["lora"]["path"]).is_file()
        converted = await session.call_tool("convert-lora", {"lora": "shapes", "to": "diffusers"})
        assert not converted.is_error, converted.content
        assert converted.structured_content["output_format"] == "diffusers"

        for tool, arguments, expected in (
            ("generate-image", {"prompt": "x", "loras": [{"lora": "../etc"}]}, "list-exported-models"),
            ("generate-image", {"prompt": "x", "model_name": "builtin:tiny-sd15", "width": 70}, "multiple of"),
            ("compare-lora-strengths", {"lora": "shapes", "prompt": "x", "strengths": [0, 5]}, "between -2 and 2"),
            ("merge-loras", {"loras": [{"lora": "shapes", "weight": 1}], "output_name": "one"}, "2"),
        ):
            result = await session.call_tool(tool, arguments)
            assert result.is_error and expected in result.content[0].text, (tool, result.content)

    run_session(server_workspace, script)


def test_a_lora_of_a_local_model_folder_finds_its_model_without_model_name(server_workspace, shapes, tiny_sd15):
    """The file names its base model by the folder's name only (no path leaves the machine); generate-image
    and convert-lora find the folder again through the run that trained it (issue 15, items 4 and 10)."""
    import shutil

    from safetensors import safe_open

    local = server_workspace.parent / "my-base-model"
    shutil.copytree(tiny_sd15, local)

    async def script(session):
        await create(session, "local", shapes, model_name=str(local), steps=2, resolution=64)
        job = await start(session, "local")
        final = await wait_for_state(session, job["job_id"], ("completed", "failed", "interrupted"))
        assert final["state"] == "completed", final
        name = final["exported_lora"]
        arguments = {"prompt": "xyz_shape", "loras": [{"lora": name}], "steps": 2}
        image = await session.call_tool("generate-image", arguments)
        assert not image.is_error, image.content
        assert image.content[-1].type == "image"
        converted = await session.call_tool("convert-lora", {"lora": name, "to": "diffusers"})
        assert not converted.is_error, converted.content

        shutil.rmtree(server_workspace / "runs" / job["job_id"])  # the run gone: the name alone finds nothing
        unfound = await session.call_tool("generate-image", {"prompt": "x", "loras": [{"lora": name}], "steps": 2})
        assert unfound.is_error and "my-base-model" in unfound.content[0].text, unfound.content
        assert "give model_name" in unfound.content[0].text, unfound.content
        return job["job_id"], name, converted.structured_content["path"]

    job_id, name, converted = run_session(server_workspace, script)
    for path in (server_workspace / "loras" / f"{name}.safetensors", Path(converted)):
        with safe_open(str(path), "np") as f:
            metadata = f.metadata()
        assert [value for value in metadata.values() if str(server_workspace.parent) in value] == []
        assert metadata["ss_sd_model_name"] == "my-base-model" and metadata["training_run"] == job_id
