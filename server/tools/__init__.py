"""The MCP tools, resources and prompts, by area; `server.app.build_server` registers them.

Each `register_*` function adds thin wrappers over the plain services in `Services`: arguments are
the tool's schema, `call` turns a ServiceError into the ToolError the assistant reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mcp.types import ToolAnnotations
from pydantic import BaseModel

from server.configs import ConfigService
from server.datasets import DatasetService
from server.jobs import JobService
from server.loras import LoraService
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


class Deleted(BaseModel):
    name: str
    deleted: bool = True
