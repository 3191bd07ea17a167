"""The MCP tools, resources and prompts, by area; `server.app.build_server` registers them.

The tools are thin wrappers over the plain services in `Services`: arguments are the tool's schema,
`call` turns a ServiceError into the ToolError the assistant reads. An area's tools are methods of a
small class, marked with `@tool` / `@resource` and registered by `add_tools`, so each one can be
imported and called without a server.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcp.server import MCPServer
from mcp.types import ToolAnnotations
from pydantic import BaseModel

from server.configs import ConfigService
from server.datasets import DatasetService
from server.job_events import JobEvents
from server.jobs import JobService
from server.loras import LoraService
from server.tools.arguments import request_tool
from server.training_runs import TrainingService
from server.uploads import UploadService

READ_ONLY = ToolAnnotations(readOnlyHint=True, idempotentHint=True)


@dataclass(frozen=True)
class Services:
    workspace: Path
    configs: ConfigService
    jobs: JobService
    loras: LoraService
    datasets: DatasetService
    uploads: UploadService
    call: Callable  # call(fn, *args): the service call, its ServiceError raised as ToolError
    resource_call: Callable  # the same for resources: ResourceNotFoundError
    training: TrainingService
    client_roots: bool = True  # the client's roots widen the allowed folders (stdio: one machine, one user)
    events: JobEvents = field(default_factory=JobEvents)  # job changes for the dashboard's event stream


class Deleted(BaseModel):
    name: str
    deleted: bool = True


def tool(
    name: str,
    description: str,
    annotations: ToolAnnotations | None = None,
    *,
    request: type[BaseModel] | None = None,
    extra: Sequence[inspect.Parameter] = (),
    leave_out: tuple[str, ...] = (),
) -> Callable:
    """Marks a method of a tools class as the MCP tool `name`; `add_tools` registers it. With `request`,
    the tool's arguments are that model's fields (less `leave_out`, then `extra`) and the method receives
    the validated model (see server/tools/arguments.py)."""

    def mark(method: Callable) -> Callable:
        method.mcp_tool = {"name": name, "description": description, "annotations": annotations}
        if request is not None:
            method.mcp_request = {"model": request, "extra": extra, "leave_out": leave_out}
        return method

    return mark


def resource(uri: str, mime_type: str, description: str) -> Callable:
    """Marks a method of a tools class as the MCP resource (template) `uri`; `add_tools` registers it."""

    def mark(method: Callable) -> Callable:
        method.mcp_resource = {"uri": uri, "mime_type": mime_type, "description": description}
        return method

    return mark


def add_tools(server: MCPServer, tools: Any) -> None:
    """Registers the marked methods of `tools`, in the order its class defines them: the order in which a
    client lists them (recorded in tests/data/tools_list.json)."""
    for attribute, member in vars(type(tools)).items():
        if spec := getattr(member, "mcp_tool", None):
            function = getattr(tools, attribute)
            if request := getattr(member, "mcp_request", None):
                returns = inspect.signature(function, eval_str=True).return_annotation
                function = request_tool(
                    request["model"],
                    function,
                    function_name=attribute,
                    returns=returns,
                    extra=request["extra"],
                    leave_out=request["leave_out"],
                )
            server.add_tool(function, **spec)
        elif spec := getattr(member, "mcp_resource", None):
            server.resource(**spec)(getattr(tools, attribute))
