"""Files over HTTP (placeholder until the routes land)."""

from __future__ import annotations

from starlette.routing import Route

from server.tools import Services


def file_routes(services: Services) -> list[Route]:
    return []
