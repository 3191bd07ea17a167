"""The MCP tools, resources and prompts, by area; `server.app.build_server` registers them.

The tools are thin wrappers over the plain services in `Services`: arguments are the tool's schema,
`call` turns a ServiceError into the ToolError the assistant reads. An area's tools are methods of a
small class, marked with `@tool` / `@resource` and registered by `add_tools`, so each one can be
imported and called without a server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcp.server import MCPServer
from mcp.types import ToolAnnotations
from pydantic import BaseModel

from server.configs import ConfigService
from server.datasets import DatasetService
from server.jobs import JobService
from server.loras import LoraService
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


class Deleted(BaseModel):
    name: str
    deleted: bool = True


def tool(name: str, description: str, annotations: ToolAnnotations | None = None) -> Callable:
    """Marks a method of a tools class as the MCP tool `name`; `add_tools` registers it."""

    def mark(method: Callable) -> Callable:
        method.mcp_tool = {"name": name, "description": description, "annotations": annotations}
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
            server.add_tool(getattr(tools, attribute), **spec)
        elif spec := getattr(member, "mcp_resource", None):
            server.resource(**spec)(getattr(tools, attribute))
