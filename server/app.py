"""The MCP server: services, the job monitor and subscriptions; the tools themselves are in server/tools/.

Tool and argument names are the LoRA training guide's (hyphenated). Every tool returns a
pydantic model (structured content plus its JSON as text) or MCP content; a bad input raises
ToolError with a message that says what was wrong and what to call next. Nothing here imports
torch or diffusers: the training runs in `lora-train` child processes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from mcp import types
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated

from server.configs import ConfigService
from server.datasets import DatasetService
from server.errors import ServiceError
from server.jobs import JobService
from server.limits import megabytes
from server.loras import LoraService
from server.tools import Services
from server.tools.datasets import register_dataset_tools
from server.tools.diagnostics import register_diagnostic_tools
from server.tools.files import register_file_tools
from server.tools.generation import register_generation_tools
from server.tools.prompts import register_prompts
from server.tools.training import register_training_tools
from server.uploads import UploadService

log = logging.getLogger("server")
MONITOR_SECONDS = 1.0  # how often finished jobs are noticed, queued ones started, and subscribers notified

INSTRUCTIONS = """Trains LoRAs for Stable Diffusion 1.x/2.x, SDXL and FLUX models in the background.
Typical flow: create-training-config (name, model_name, dataset_path, trigger_word, test_prompts) ->
validate-training-config -> start-training (returns a job_id at once) -> get-training-status every
minute or so -> get-training-samples to look at progress -> the LoRA path is in the final status.
Training takes minutes to hours: never wait inside a tool call, poll get-training-status."""


def build_server(workspace: Path) -> MCPServer:
    workspace = Path(workspace)
    configs = ConfigService(workspace)
    jobs = JobService(workspace)
    loras = LoraService(workspace)
    datasets = DatasetService(workspace)
    uploads = UploadService(workspace, max_total_size=megabytes("LORA_MCP_MAX_UPLOAD_MB", 4096))
    lock = threading.Lock()  # tools run in worker threads; the job service is not re-entrant

    def call(fn: Callable, *args, error: type[Exception] = ToolError):
        """Run a service call; its ServiceError becomes the ToolError the assistant reads (or, for a
        resource, the not-found error its reader gets)."""
        try:
            with lock:
                return fn(*args)
        except ServiceError as exc:
            raise error(str(exc)) from None

    def resource_call(fn: Callable, *args):
        return call(fn, *args, error=ResourceNotFoundError)

    @asynccontextmanager
    async def lifespan(_server: MCPServer) -> AsyncIterator[None]:
        """Reconcile the job table at start-up and keep it current while the server runs."""

        async def monitor() -> None:
            seen: dict[str, tuple] = {}
            while True:
                try:
                    statuses = await anyio.to_thread.run_sync(lambda: call(jobs.list))
                    for status in statuses:
                        # What a watcher cares about; a change notifies subscribers of the status resource.
                        fingerprint = (status.state, status.step, status.last_checkpoint, tuple(status.latest_samples))
                        if seen.get(status.job_id) != fingerprint:
                            seen[status.job_id] = fingerprint
                            await notify_updated(f"lora://jobs/{status.job_id}/status")
                except Exception:  # keep monitoring; the next tick retries
                    log.exception("job monitor tick failed")
                await anyio.sleep(MONITOR_SECONDS)

        async with anyio.create_task_group() as group:
            group.start_soon(monitor)
            yield
            group.cancel_scope.cancel()

    # Status updates reach subscribers of both protocol eras: `subscriptions/listen` streams
    # (2026-07-28) through the bus, and sessions that sent `resources/subscribe` (earlier versions)
    # through a resources/updated notification on their session.
    bus = InMemorySubscriptionBus()
    legacy_subscribers: dict[str, set] = {}

    async def notify_updated(uri: str) -> None:
        await bus.publish(ResourceUpdated(uri=uri))
        for session in list(legacy_subscribers.get(uri, ())):
            try:
                await session.send_resource_updated(uri)
            except Exception:  # the client went away: forget it
                legacy_subscribers[uri].discard(session)

    async def subscribe(ctx, params: types.SubscribeRequestParams) -> types.EmptyResult:
        legacy_subscribers.setdefault(str(params.uri), set()).add(ctx.session)
        return types.EmptyResult()

    async def unsubscribe(ctx, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        legacy_subscribers.get(str(params.uri), set()).discard(ctx.session)
        return types.EmptyResult()

    server = MCPServer("lora-trainer", instructions=INSTRUCTIONS, lifespan=lifespan, subscriptions=bus)
    # MCPServer has no decorator for the pre-2026 subscribe requests; its low-level server takes them
    # (registering them also advertises the resources.subscribe capability).
    server._lowlevel_server.add_request_handler("resources/subscribe", types.SubscribeRequestParams, subscribe)
    server._lowlevel_server.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, unsubscribe)

    services = Services(workspace, configs, jobs, loras, datasets, uploads, call, resource_call)
    register_dataset_tools(server, services)
    register_training_tools(server, services)
    register_diagnostic_tools(server, services)
    register_file_tools(server, services)
    register_generation_tools(server, services)
    register_prompts(server)
    return server
