"""`lora-mcp http`: the same tools and services as stdio, served over HTTP by one process.

Routes, all behind `AccessGuard` (Host/Origin, then the bearer token or, for the dashboard, its session cookie):
    /mcp                         MCP Streamable HTTP (the SDK's transport): chat clients, bridges, the Inspector
    POST /mcp/tool, GET /mcp/tools   the guide's JSON API (server/http/tool_api.py)
    GET /loras/{name}.safetensors    an exported LoRA, with Range (server/http/files.py)
    POST /datasets/{name}            a zip of images and captions, checked like upload-dataset
    / and /dashboard/...             the web dashboard: a login with the token, then pages, JSON, sample images,
                                     stop/resume and live events (server/http/dashboard.py)

The job monitor (the MCP server's lifespan) runs once for the process, whatever the number of sessions; it
also feeds the dashboard's event stream.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio
import uvicorn
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp

from server.app import build_server, open_services
from server.datasets import MAX_IMAGES_PER_CALL
from server.http.access import (
    AccessGuard,
    BadTokenLimit,
    Exposure,
    TokenSource,
    error_response,
    existing_token,
    is_loopback,
)
from server.http.dashboard import Dashboard
from server.http.files import file_routes
from server.http.sessions import Sessions
from server.http.tool_api import tool_routes
from server.image_checks import MAX_IMAGE_BYTES
from server.limits import MB, megabytes

log = logging.getLogger("server.http")

DEFAULT_PORT = 8190  # the guide's examples call http://localhost:8190/mcp/tool
# An upload-dataset call at its own limits (200 images of up to 50 MB, base64: 4/3 the bytes) must fit, as it
# does over stdio; the body is read only after the token has been checked.
DEFAULT_MAX_REQUEST_MB = MAX_IMAGES_PER_CALL * MAX_IMAGE_BYTES * 4 / 3 / MB + 1


@dataclass(frozen=True)
class HttpOptions:
    """The options of `lora-mcp http`."""

    exposure: Exposure
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None


def build_http_app(workspace: Path, *, token: TokenSource | None, exposure: Exposure) -> ASGIApp:
    """The whole HTTP server as one ASGI app; `token` None only with --no-auth on loopback."""
    max_body = megabytes("LORA_MCP_MAX_REQUEST_MB", DEFAULT_MAX_REQUEST_MB)
    services = open_services(workspace, client_roots=False)
    server = build_server(workspace, services)
    # One session signer and one bad-token count for the guard and the dashboard's login.
    sessions, limit = Sessions(token), BadTokenLimit()
    dashboard = Dashboard(services, sessions, limit)
    for route in tool_routes(server, max_body) + file_routes(services) + dashboard.routes():
        server.custom_route(route.path, methods=sorted(route.methods or ()))(route.endpoint)
    security = exposure.security_settings()
    app = server.streamable_http_app(
        streamable_http_path="/mcp",
        max_request_body_size=max_body,
        transport_security=security,
        host=exposure.host,
    )
    for status in (404, 405, 500):
        app.add_exception_handler(status, refusal)
    return AccessGuard(app, token=token, security=security, sessions=sessions, limit=limit,
                       login_page=dashboard.login_page)


ROUTES = (
    "GET /mcp/tools, POST /mcp/tool (the JSON API), /mcp (MCP Streamable HTTP), GET /loras/{name}.safetensors, "
    "POST /datasets/{name} and the web dashboard at /"
)


async def refusal(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals in the JSON API's error shape: a path no route matches (404), a method the
    route does not take (405), and a fault of ours (500; uvicorn logs its traceback)."""
    if isinstance(exc, HTTPException) and exc.status_code == 404:
        return error_response(404, f"there is no {request.url.path} here: this server has {ROUTES}")
    if isinstance(exc, HTTPException) and exc.status_code == 405:
        return error_response(405, f"{request.url.path} does not take {request.method}: this server has {ROUTES}",
                              dict(exc.headers or {}))
    return error_response(500, "the server failed on this request (its log says why): try again, and report it if "
                          "it keeps failing")


def serve(workspace: Path, options: HttpOptions) -> int:
    """Check the exposure, bind, say where the token is, and serve until interrupted."""
    exposure = options.exposure
    token = exposure.check(workspace)  # refuses an unsafe start before anything binds
    app = build_http_app(workspace, token=token, exposure=exposure)
    family = socket.AF_INET6 if ":" in exposure.host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY on accepted connections only then, and without it
    # every response waits on a delayed ACK (measured: 44 ms per call instead of 0.4 ms).
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    if os.name != "nt":  # on Windows SO_REUSEADDR would let a second process take the same port
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((exposure.host.strip("[]"), exposure.port))
    # Listen before saying where we serve: a client that reads the line below and connects while uvicorn
    # still runs the lifespan waits in the backlog instead of being refused (uvicorn listens only after it).
    listener.listen()
    port = listener.getsockname()[1]
    scheme = "https" if options.ssl_certfile else "http"
    shown_host = f"[{exposure.host.strip('[]')}]" if family == socket.AF_INET6 else exposure.host
    url = f"{scheme}://{shown_host}:{port}"
    where = existing_token(workspace)[1] if token else None
    print(
        f"lora-mcp http: serving {url} (MCP Streamable HTTP at {url}/mcp, JSON API at {url}/mcp/tool); "
        + (f"token in {where}" if where else "no token (--no-auth, loopback only)"),
        file=sys.stderr,
        flush=True,
    )
    if not is_loopback(exposure.host) and not options.ssl_certfile:
        log.warning("serving %s without TLS: the token crosses the network in clear unless a proxy adds TLS", url)
    config = uvicorn.Config(
        app,
        ssl_certfile=str(options.ssl_certfile) if options.ssl_certfile else None,
        ssl_keyfile=str(options.ssl_keyfile) if options.ssl_keyfile else None,
        log_config=None,  # our logging: stderr and <workspace>/logs/server.log
        # No line per request (10 pollers at 1 call/s would write 860,000 a day); AccessGuard logs its refusals.
        access_log=False,
        # The client's address is the TCP peer's. uvicorn would otherwise take X-Forwarded-For from 127.0.0.1, so
        # anyone on this machine (or a proxy passing the header on) could aim the bad-token lockout at another
        # address and never be locked out themselves. Behind a proxy every client has the proxy's address.
        proxy_headers=False,
        timeout_graceful_shutdown=5,
    )
    anyio.run(uvicorn.Server(config).serve, [listener])
    return 0
