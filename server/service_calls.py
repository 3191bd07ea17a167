"""How the tools call the services: a service's ServiceError becomes the error the MCP client reads."""

from __future__ import annotations

from collections.abc import Callable

from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError

from server.errors import ServiceError, WorkspaceStateError


class WorkspaceStateToolError(ToolError):
    """The ToolError of a WorkspaceStateError: the workspace's state refused the call, not its arguments.
    The HTTP API answers it 409, any other ToolError 422."""


def tool_error(exc: ServiceError, error: type[Exception] = ToolError) -> Exception:
    """The error the MCP client reads for a service's ServiceError, same message: `error`, or for a
    WorkspaceStateError the WorkspaceStateToolError when `error` is ToolError."""
    if error is ToolError and isinstance(exc, WorkspaceStateError):
        return WorkspaceStateToolError(str(exc))
    return error(str(exc))


class ServiceCalls:
    """Service calls made from the tools. They run side by side, in the SDK's worker threads: there is
    no lock here. Each service guards what it changes (server/name_locks.py for configs, datasets and
    LoRA files; SQLite transactions for the job table; upload_store's lock per upload), so a slow call
    (get-dataset-info on hundreds of images) holds up no one else."""

    def call(self, fn: Callable, *args, error: type[Exception] = ToolError):
        """Run a service call; its ServiceError becomes the ToolError the assistant reads (or, for a
        resource, the not-found error its reader gets)."""
        try:
            return fn(*args)
        except ServiceError as exc:
            raise tool_error(exc, error) from None

    def resource_call(self, fn: Callable, *args):
        return self.call(fn, *args, error=ResourceNotFoundError)
