"""How the tools call the services: a service's ServiceError becomes the error the MCP client reads."""

from __future__ import annotations

import threading
from collections.abc import Callable

from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError

from server.errors import ServiceError


class ServiceCalls:
    """Service calls made from the tools, one at a time: tools run in worker threads, and the job
    service is not re-entrant."""

    def __init__(self):
        self._lock = threading.Lock()

    def call(self, fn: Callable, *args, error: type[Exception] = ToolError):
        """Run a service call; its ServiceError becomes the ToolError the assistant reads (or, for a
        resource, the not-found error its reader gets)."""
        try:
            with self._lock:
                return fn(*args)
        except ServiceError as exc:
            raise error(str(exc)) from None

    def resource_call(self, fn: Callable, *args):
        return self.call(fn, *args, error=ResourceNotFoundError)
