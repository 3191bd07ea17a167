"""The MCP server over Streamable HTTP (`lora-mcp http`, a real child process) through the SDK's client.

One training run of the tiny model, started by one client while others are connected, is shared by
the tests of this module (`run`): its status-change notifications must reach a session that sent
`resources/subscribe` (the handshake era) and a client that opened `subscriptions/listen`
(2026-07-28, what the SDK's `Client` negotiates by default), both over the HTTP stream.
"""

from __future__ import annotations

import base64
import time
import warnings
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from training.data.synthetic import make_shape_dataset

ENDED = ("completed", "failed", "stopped", "interrupted")


def http_client(server) -> httpx2.AsyncClient:
    # The SDK's own defaults: a response stream may stay open for minutes between events.
    return httpx2.AsyncClient(headers=server.headers, timeout=httpx2.Timeout(30, read=300))


@asynccontextmanager
async def handshake_session(server, message_handler=None):
    """A ClientSession that connects the pre-2026 way (initialize), as most chat clients do today."""
    async with (
        http_client(server) as client,
        streamable_http_client(f"{server.url}/mcp", http_client=client) as (read, write),
        ClientSession(read, write, message_handler=message_handler) as session,
    ):
        await session.initialize()
        yield session


@asynccontextmanager
async def default_client(server):
    """The SDK's `Client` as it connects by default (server/discover, else initialize)."""
    async with http_client(server) as client:
        async with Client(streamable_http_client(f"{server.url}/mcp", http_client=client)) as connected:
            yield connected


def ok(result: types.CallToolResult) -> types.CallToolResult:
    assert not result.is_error, result.content
    return result


def dataset_images(folder: Path) -> list[dict]:
    """upload-dataset's `images`: four 64 px PNGs with captions, base64."""
    return [
        {
            "filename": image.name,
            "content": base64.b64encode(image.read_bytes()).decode(),
            "caption": image.with_suffix(".txt").read_text(),
        }
        for image in make_shape_dataset(folder, 4, trigger_word="xyz_shape")
    ]


@dataclass
class TrainingRun:
    """What the clients saw of one training run."""

    job_id: str
    final: dict  # get-training-status once the job ended
    legacy_updates: list[str] = field(default_factory=list)  # resources/updated URIs (resources/subscribe)
    listen_updates: list[str] = field(default_factory=list)  # ResourceUpdated URIs (subscriptions/listen)
    listen_protocol: str = ""
    other_client_jobs: list[str] = field(default_factory=list)  # list-training-jobs of a second client
    other_client_status: dict = field(default_factory=dict)  # get-training-status of that client, just after the start


@pytest.fixture(scope="module")
def run(http_server, tmp_path_factory) -> TrainingRun:
    """upload-dataset -> create-training-config -> start-training by one client, watched until it ends
    by that client (subscribed) and by a second one (listening), each over its own HTTP stream."""
    images = dataset_images(tmp_path_factory.mktemp("upload") / "shapes")

    async def main() -> TrainingRun:
        legacy_updates: list[str] = []

        async def on_message(message) -> None:
            if isinstance(message, types.ResourceUpdatedNotification):
                legacy_updates.append(str(message.params.uri))

        async with handshake_session(http_server, on_message) as first, default_client(http_server) as second:
            uploaded = ok(await first.call_tool("upload-dataset", {"dataset_name": "mcp-shapes", "images": images}))
            assert uploaded.structured_content["saved"] == 4, uploaded.structured_content
            ok(
                await first.call_tool(
                    "create-training-config",
                    {
                        "name": "mcp-shapes-style",
                        "model_name": "builtin:tiny-sd15",
                        "dataset_path": "mcp-shapes",
                        "trigger_word": "xyz_shape",
                        "resolution": 64,
                        "steps": 2,
                        "batch_size": 2,
                        "rank": 4,
                        "learning_rate": 1e-3,
                        "test_prompts": ["xyz_shape a red circle"],
                        "sample_every": 2,
                        "sample_steps": 2,
                    },
                )
            )
            started = ok(await first.call_tool("start-training", {"config_name": "mcp-shapes-style"}))
            job_id = started.structured_content["job_id"]
            uri = f"lora://jobs/{job_id}/status"
            with warnings.catch_warnings():  # deprecated as of 2026-07-28: the handshake era is tested on purpose
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                await first.subscribe_resource(uri)
            result = TrainingRun(job_id, {}, legacy_updates, listen_protocol=second.protocol_version)

            async with second.listen(resource_subscriptions=[uri]) as subscription:
                assert subscription.honored.resource_subscriptions == [uri]

                async def collect() -> None:
                    async for event in subscription:
                        result.listen_updates.append(str(event.uri))

                async with anyio.create_task_group() as group:
                    group.start_soon(collect)
                    jobs = ok(await second.call_tool("list-training-jobs", {})).structured_content["jobs"]
                    result.other_client_jobs = [job["job_id"] for job in jobs]
                    result.other_client_status = ok(
                        await second.call_tool("get-training-status", {"job_id": job_id})
                    ).structured_content
                    result.final = await wait_until_ended(first, job_id)
                    group.cancel_scope.cancel()
            return result

    return anyio.run(main)


async def wait_until_ended(session: ClientSession, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = ok(await session.call_tool("get-training-status", {"job_id": job_id})).structured_content
        if status["state"] in ENDED:
            return status
        await anyio.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end within {timeout} s")


def test_the_job_trains_to_a_lora(run):
    assert run.final["state"] == "completed", run.final
    assert run.final["step"] == run.final["total_steps"] == 2
    assert Path(run.final["lora_path"]).is_file()


def test_a_resources_subscribe_session_is_told_of_status_changes(run):
    assert run.legacy_updates, "no resources/updated notification reached the subscribed session"
    assert set(run.legacy_updates) == {f"lora://jobs/{run.job_id}/status"}


def test_a_listening_client_is_told_of_status_changes(run):
    assert run.listen_protocol in MODERN_PROTOCOL_VERSIONS  # the SDK's default client speaks 2026-07-28 to us
    assert run.listen_updates, "no ResourceUpdated event reached the subscriptions/listen stream"
    assert set(run.listen_updates) == {f"lora://jobs/{run.job_id}/status"}


def test_a_second_client_sees_the_first_clients_job(run):
    assert run.job_id in run.other_client_jobs
    assert run.other_client_status["job_id"] == run.job_id
    assert run.other_client_status["config_name"] == "mcp-shapes-style"


def test_samples_come_back_as_images(http_server, run):
    async def main():
        async with handshake_session(http_server) as session:
            return ok(await session.call_tool("get-training-samples", {"job_id": run.job_id}))

    samples = anyio.run(main)
    images = [item for item in samples.content if isinstance(item, types.ImageContent)]
    # each as PNG or JPEG, whichever is smaller (issue 16 item 4)
    signatures = {"image/png": b"\x89PNG", "image/jpeg": b"\xff\xd8\xff"}
    assert images and all(base64.b64decode(image.data).startswith(signatures[image.mime_type]) for image in images)
    assert "step 2" in samples.content[0].text


def test_inline_captioning_reports_progress_over_the_stream(http_server, tmp_path):
    images = dataset_images(tmp_path / "to-caption")
    for image in images:
        image["caption"] = ""  # nothing captioned yet: the template writes every caption
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    async def main():
        async with handshake_session(http_server) as session:
            ok(await session.call_tool("upload-dataset", {"dataset_name": "to-caption", "images": images}))
            return ok(
                await session.call_tool(
                    "generate-captions",
                    {"dataset_name": "to-caption", "caption_model": "template", "trigger_word": "xyz_shape"},
                    progress_callback=on_progress,
                )
            )

    captioned = anyio.run(main)
    assert captioned.structured_content["captioned"] == 4, captioned.structured_content
    assert progress, "no progress notification arrived over HTTP"
    assert progress[-1][:2] == (4, 4) and progress[-1][2] == "4/4 images captioned"


def test_several_clients_call_tools_at_once(http_server, tmp_path):
    images = dataset_images(tmp_path / "concurrent")
    seen: dict[int, set[str]] = {}

    async def one_client(index: int) -> None:
        async with handshake_session(http_server) as session:
            name = f"concurrent-{index}"
            saved = ok(await session.call_tool("upload-dataset", {"dataset_name": name, "images": images}))
            assert saved.structured_content["saved"] == 4, saved.structured_content
            listed = ok(await session.call_tool("list-datasets", {})).structured_content["datasets"]
            seen[index] = {dataset["name"] for dataset in listed}

    async def main():
        async with anyio.create_task_group() as group:
            for index in range(3):
                group.start_soon(one_client, index)

    anyio.run(main)
    assert sorted(seen) == [0, 1, 2]
    for index, names in seen.items():
        assert f"concurrent-{index}" in names  # each client sees at least its own upload
