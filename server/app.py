"""The MCP server: services, the job monitor and subscriptions; the tools themselves are in server/tools/.

Tool and argument names are the LoRA training guide's (hyphenated). Every tool returns a
pydantic model (structured content plus its JSON as text) or MCP content; a bad input raises
ToolError with a message that says what was wrong and what to call next. Nothing here imports
torch or diffusers: the training runs in `lora-train` child processes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from mcp import types
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated

from server.configs import ConfigService
from server.dashboard_views import job_row
from server.datasets import DatasetService
from server.jobs import JobService, JobStatus
from server.limits import megabytes
from server.loras import LoraService
from server.tools import Services
from server.tools.dashboard import dashboard_apps
from server.tools.datasets import register_dataset_tools
from server.tools.diagnostics import register_diagnostic_tools
from server.tools.evaluation import register_evaluation_tools
from server.tools.files import register_file_tools
from server.tools.generation import register_generation_tools
from server.service_calls import ServiceCalls
from server.tools.prompts import register_prompts
from server.tools.training import register_training_tools
from server.training_runs import TrainingService
from server.uploads import UploadService

log = logging.getLogger("server")
MONITOR_SECONDS = 1.0  # how often finished jobs are noticed, queued ones started, and subscribers notified

INSTRUCTIONS = """Trains LoRAs for Stable Diffusion 1.x/2.x, SDXL and FLUX models in the background.
Typical flow: create-training-config (name, model_name, dataset_path, trigger_word, test_prompts) ->
validate-training-config -> start-training (returns a job_id at once) -> get-training-status every
minute or so -> get-training-samples to look at progress -> the LoRA path is in the final status.
Training takes minutes to hours: never wait inside a tool call, poll get-training-status.
To show the user a job live (charts, samples, stop/resume), call show-training-dashboard once: clients with
MCP Apps draw it in the chat and it refreshes itself; others get its text summary."""


def open_services(workspace: Path, *, client_roots: bool = True) -> Services:
    """The services every front end calls. `client_roots`: whether folders the MCP client offers as roots
    widen the folders the server may use; true for stdio, where client and server share one machine."""
    workspace = Path(workspace)
    calls = ServiceCalls()
    configs, jobs = ConfigService(workspace), JobService(workspace)
    return Services(
        workspace=workspace,
        configs=configs,
        jobs=jobs,
        loras=LoraService(workspace),
        datasets=DatasetService(workspace),
        uploads=UploadService(workspace, max_total_size=megabytes("LORA_MCP_MAX_UPLOAD_MB", 4096)),
        call=calls.call,
        resource_call=calls.resource_call,
        training=TrainingService(configs, jobs),
        client_roots=client_roots,
    )


def build_server(workspace: Path, services: Services | None = None) -> MCPServer:
    services = services or open_services(workspace)
    subscriptions = Subscriptions()
    server = MCPServer(
        "lora-trainer",
        instructions=INSTRUCTIONS,
        lifespan=job_monitor(lambda: services.call(services.jobs.list), job_changed(services, subscriptions)),
        subscriptions=subscriptions.bus,
        extensions=[dashboard_apps(services)],  # MCP Apps: show-training-dashboard and its ui:// page
    )
    subscriptions.register(server)
    register_dataset_tools(server, services)
    register_training_tools(server, services)
    register_diagnostic_tools(server, services)
    register_file_tools(server, services)
    register_generation_tools(server, services)
    register_evaluation_tools(server, services)
    register_prompts(server)
    return server


def job_changed(services: Services, subscriptions: Subscriptions) -> Callable[[JobStatus], Awaitable[None]]:
    """What the monitor does for a job whose status changed: notify the MCP subscribers of its status resource,
    and publish its row to the dashboard's open pages (server/job_events.py)."""

    async def changed(status: JobStatus) -> None:
        await subscriptions.notify_updated(f"lora://jobs/{status.job_id}/status")
        if services.events.listening:  # the stdio server never has a reader: no row is built for it
            services.events.publish("job", job_row(status).model_dump(mode="json"))

    return changed


def job_monitor(list_jobs: Callable[[], list[JobStatus]], changed: Callable[[JobStatus], Awaitable[None]]):
    """The server's lifespan: reconcile the job table at start-up and keep it current while the server
    runs, telling `changed` about each job whose status changed (the MCP subscribers, the dashboard)."""

    @asynccontextmanager
    async def lifespan(_server: MCPServer) -> AsyncIterator[None]:
        async def monitor() -> None:
            seen: dict[str, tuple] = {}
            while True:
                try:
                    for status in await anyio.to_thread.run_sync(list_jobs):
                        # What a watcher cares about; a change notifies subscribers and the dashboard.
                        fingerprint = (status.state, status.phase, status.step, status.last_checkpoint,
                                       tuple(status.latest_samples))
                        if seen.get(status.job_id) != fingerprint:
                            seen[status.job_id] = fingerprint
                            await changed(status)
                except Exception:  # keep monitoring; the next tick retries
                    log.exception("job monitor tick failed")
                await anyio.sleep(MONITOR_SECONDS)

        async with anyio.create_task_group() as group:
            group.start_soon(monitor)
            yield
            group.cancel_scope.cancel()

    return lifespan


class Subscriptions:
    """Status updates reach subscribers of both protocol eras: `subscriptions/listen` streams
    (2026-07-28) through the bus, and sessions that sent `resources/subscribe` (earlier versions)
    through a resources/updated notification on their session."""

    def __init__(self):
        self.bus = InMemorySubscriptionBus()
        self._legacy: dict[str, set] = {}

    def register(self, server: MCPServer) -> None:
        # MCPServer has no decorator for the pre-2026 subscribe requests; its low-level server takes them
        # (registering them also advertises the resources.subscribe capability).
        server._lowlevel_server.add_request_handler("resources/subscribe", types.SubscribeRequestParams, self.subscribe)
        server._lowlevel_server.add_request_handler(
            "resources/unsubscribe", types.UnsubscribeRequestParams, self.unsubscribe
        )

    async def notify_updated(self, uri: str) -> None:
        await self.bus.publish(ResourceUpdated(uri=uri))
        for session in list(self._legacy.get(uri, ())):
            try:
                await session.send_resource_updated(uri)
            except Exception:  # the client went away: forget it
                self._legacy[uri].discard(session)

    async def subscribe(self, ctx, params: types.SubscribeRequestParams) -> types.EmptyResult:
        self._legacy.setdefault(str(params.uri), set()).add(ctx.session)
        return types.EmptyResult()

    async def unsubscribe(self, ctx, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        self._legacy.get(str(params.uri), set()).discard(ctx.session)
        return types.EmptyResult()
