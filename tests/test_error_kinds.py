"""Which refusals are about the workspace's state (WorkspaceStateError: HTTP 409) and which about the
arguments (a plain ServiceError: HTTP 422), through the real tools of the real MCP server, whose
`call_tool` raises a ToolError caused by the error the tool raised, as the HTTP API reads it."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import anyio
import pytest
from conftest import fast_config
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError

from server.app import build_server
from server.configs import ConfigService
from server.errors import ServiceError, WorkspaceStateError
from server.jobs import JobService
from server.names import checked_name
from server.service_calls import ServiceCalls, WorkspaceStateToolError


def tool_refusal(workspace: Path, tool: str, arguments: dict) -> tuple[BaseException, str]:
    """Call `tool` on a fresh server over `workspace`: the error the tool raised (the ToolError's cause)
    and the message, which must fail the call."""

    async def main():
        with pytest.raises(ToolError) as refused:
            await build_server(workspace).call_tool(tool, arguments)
        return refused.value

    error = anyio.run(main)
    assert isinstance(error.__cause__, ToolError), repr(error.__cause__)
    return error.__cause__, str(error.__cause__)


def config_values(dataset: Path, name: str) -> dict:
    return {"name": name, "model_name": "builtin:tiny-sd15", "dataset_path": str(dataset), "resolution": 64}


@pytest.mark.parametrize(
    ("tool", "arguments", "message"),
    [
        (
            "get-training-status",
            {"job_id": "0123456789ab"},
            "no job '0123456789ab'; list-training-jobs shows the jobs there are",
        ),
        ("stop-training", {"job_id": "0123456789ab"}, "no job '0123456789ab'"),
        ("get-dataset-info", {"dataset_name": "nowhere"}, "no dataset 'nowhere'; list-datasets shows"),
        ("delete-config", {"name": "never-made"}, "no config named 'never-made' (there are no saved configs yet)"),
        (
            "upload-lora-chunked-append",
            {"upload_id": str(uuid.UUID(int=7, version=4)), "chunk_index": 0, "chunk": "AAAA"},
            "there is no upload",
        ),
    ],
)
def test_an_unknown_thing_is_the_workspaces_state(tmp_path, tool, arguments, message):
    error, text = tool_refusal(tmp_path, tool, arguments)
    assert isinstance(error, WorkspaceStateToolError), repr(error)
    assert text.startswith(message), text


def test_a_config_name_already_taken_is_the_workspaces_state(tmp_path, shapes):
    ConfigService(tmp_path).create(config_values(shapes, "taken"))
    with pytest.raises(WorkspaceStateError, match="config 'taken' already exists: change it with"):
        ConfigService(tmp_path).create(config_values(shapes, "taken"))

    error, text = tool_refusal(tmp_path, "create-training-config", config_values(shapes, "taken"))
    assert isinstance(error, WorkspaceStateToolError), repr(error)
    assert text == (
        "config 'taken' already exists: change it with update-training-config, or remove it with delete-config first"
    )


@pytest.mark.parametrize(
    ("tool", "arguments", "message"),
    [
        (
            "create-training-config",
            {"name": "..", "dataset_path": "d"},
            "config name '..' is not allowed: use 1-",
        ),
        (
            "get-dataset-info",
            {"dataset_name": "../etc"},
            "dataset name '../etc' is not allowed",
        ),
        (
            "upload-lora-chunked-start",
            {"upload_id": str(uuid.UUID(int=8, version=4)), "filename": "a.safetensors", "total_size": 2**50},
            f"total_size {2**50} is outside 1 to",
        ),
        (
            "upload-dataset",
            {"dataset_name": "d", "images": [{"filename": "x.png", "content": "not base64 at all!", "caption": "x"}]},
            "no image was saved to dataset 'd'; every file was refused: x.png: content is not valid base64",
        ),
    ],
)
def test_a_malformed_or_out_of_range_argument_is_not_the_workspaces_state(tmp_path, tool, arguments, message):
    error, text = tool_refusal(tmp_path, tool, arguments)
    assert not isinstance(error, WorkspaceStateToolError), repr(error)
    assert text.startswith(message), text


def test_the_services_raise_the_same_kinds(tmp_path):
    with pytest.raises(ServiceError, match="is not allowed") as malformed:
        checked_name("dataset", "a/../b")
    assert type(malformed.value) is ServiceError
    with pytest.raises(WorkspaceStateError, match="no job 'nope'"):
        JobService(tmp_path).status("nope")


def test_stopping_a_finished_job_is_the_workspaces_state(tmp_path, tiny_sd15):
    (tmp_path / "models").symlink_to(tiny_sd15.parent)  # the session's built-in models, not rebuilt
    jobs = JobService(tmp_path, stop_timeout=30)
    job = jobs.start("nodata", fast_config(tmp_path / "missing", steps=2).to_yaml())  # fails at once: no dataset
    deadline = time.monotonic() + 240
    while jobs.status(job.job_id).state != "failed":
        assert time.monotonic() < deadline, jobs.status(job.job_id)
        time.sleep(0.1)

    with pytest.raises(WorkspaceStateError, match=f"job {job.job_id} is already failed; nothing to stop"):
        jobs.stop(job.job_id)
    with pytest.raises(WorkspaceStateToolError, match=f"job {job.job_id} is already failed; nothing to stop"):
        ServiceCalls().call(jobs.stop, job.job_id)

    error, text = tool_refusal(tmp_path, "stop-training", {"job_id": job.job_id})
    assert isinstance(error, WorkspaceStateToolError) and text == f"job {job.job_id} is already failed; nothing to stop"


def test_a_resource_keeps_its_not_found_error(tmp_path):
    with pytest.raises(ResourceNotFoundError, match="no config named 'gone'") as refused:
        ServiceCalls().resource_call(ConfigService(tmp_path).get, "gone")
    assert not isinstance(refused.value, ToolError)
