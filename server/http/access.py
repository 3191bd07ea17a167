"""Who may use the HTTP server: the bearer token, the Host/Origin checks and the bad-token limit.

The token is one static secret per workspace: `LORA_MCP_TOKEN` when set, else the file
`<workspace>/http-token` (owner-only), which a loopback start creates when it is missing and
`lora-mcp token [--rotate]` shows or replaces. The API and file routes need `Authorization: Bearer <token>`;
a token in the query string is never read (URLs end up in logs, proxies and browser history). The web
dashboard (`/` and `/dashboard/...`) takes only its session cookie instead (server/http/sessions.py), which a
login with the token sets; a bearer header opens no dashboard route and a cookie no other route.
Host/Origin checks (the SDK's transport security settings) stop DNS rebinding: a web page the user
opens must not reach a server on their loopback interface through a name it controls.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http.sessions import Sessions

log = logging.getLogger("server.http")

TOKEN_ENV = "LORA_MCP_TOKEN"
TOKEN_FILE = "http-token"
TOKEN_BYTES = 32  # 256 bits, URL-safe base64: 43 characters
# Ten wrong tokens in a minute from one address is not a typo: that address is refused (429) for a minute.
BAD_TOKEN_LIMIT = 10
BAD_TOKEN_WINDOW_S = 60.0
LOCKOUT_S = 60.0
# Addresses remembered by the bad-token limit, in each of its two tables (~300 bytes each: a few MB at most).
MAX_TRACKED = 10_000
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
SESSION_SCOPE_KEY = "lora_mcp.session"  # where the guard leaves a dashboard request's session id for its route
# Dashboard responses: only this server's own scripts, styles and images, never framed (clickjacking), no
# sniffing, no referrer to other sites; nothing of the data is cached (the static assets may be). Not
# "no-referrer": under it Chromium sends `Origin: null` with a same-site form post, and the login form's POST
# would fail the Origin check.
DASHBOARD_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
NO_STORE = {"Cache-Control": "no-store"}


class ExposureRefused(RuntimeError):
    """A start that would expose the server unsafely; the message says what to do instead."""


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every refusal of the HTTP server has the JSON API's error shape."""
    return JSONResponse({"error": {"message": message}}, status_code=status, headers=headers)


# --- the token -------------------------------------------------------------------------------------
def token_path(workspace: Path) -> Path:
    return Path(workspace) / TOKEN_FILE


def existing_token(workspace: Path) -> tuple[str, str] | None:
    """The token and where it comes from (the environment variable or the file), or None. A token file that
    other users may read is refused (ExposureRefused), as ssh refuses a readable private key: the token is
    no secret any more, and serving with it would pretend otherwise."""
    if token := os.environ.get(TOKEN_ENV, "").strip():
        return token, f"the {TOKEN_ENV} environment variable"
    path = token_path(workspace)
    if not path.is_file():
        return None
    if os.name == "posix" and (mode := path.stat().st_mode & 0o777) & 0o077:
        raise ExposureRefused(
            f"the token file {path} may be read by other users of this machine (permissions {mode:o}): run "
            f"`chmod 600 {path}`, and `lora-mcp token --rotate` if someone may have read it, then start again"
        )
    if token := path.read_text(encoding="utf-8").strip():
        return token, str(path)
    return None


def write_new_token(workspace: Path) -> str:
    """A new random token in `<workspace>/http-token`, created owner-only (mkstemp's 0600) and
    renamed into place, so no reader ever sees it half-written or readable by others."""
    path = token_path(workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    fd, name = tempfile.mkstemp(prefix=f".{TOKEN_FILE}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return token


class TokenSource:
    """The token a running server requires: the environment variable's, else the file's as it is now, so
    that `lora-mcp token --rotate` takes effect at once (re-read when the file changes; one stat a request)."""

    def __init__(self, workspace: Path):
        self._path = token_path(workspace)
        self._env = os.environ.get(TOKEN_ENV, "").strip() or None
        self._seen: tuple[int, int, int] | None = None
        self._token: str | None = None

    def current(self) -> str | None:
        if self._env:
            return self._env
        try:
            stat = self._path.stat()
        except OSError:  # removed while serving: nobody gets in until a token exists again
            return None
        # The inode too: two rotations within one mtime tick write files of the same size, but each is a new file.
        seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if seen != self._seen:
            self._token = self._path.read_text(encoding="utf-8").strip() or None
            self._seen = seen
        return self._token


# --- exposure --------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it could resolve to anything
        return False


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class Exposure:
    """What a start of `lora-mcp http` exposes: where it listens, whether it checks a token, and the
    names clients may use for it (Host and Origin headers)."""

    host: str
    port: int
    auth: bool
    allowed_hosts: tuple[str, ...] = ()
    tls: bool = False

    def check(self, workspace: Path) -> TokenSource | None:
        """Refuse an unsafe start before anything binds; return the token to require (None with --no-auth).
        A loopback start creates the token file when there is none; any other start needs a token that
        already exists, so that nobody exposes a server whose secret they have never seen."""
        loopback = is_loopback(self.host)
        if not self.auth:
            if not loopback:
                raise ExposureRefused(
                    f"--no-auth is only for loopback addresses (127.0.0.1, ::1, localhost), not {self.host}: anyone "
                    "who can reach that address could train, read and delete. Drop --no-auth (clients then send "
                    "'Authorization: Bearer <token>'; `lora-mcp token` shows it), or keep --host 127.0.0.1 and "
                    "reach the server through an SSH tunnel (ssh -L 8190:127.0.0.1:8190 host)."
                )
            return None
        # Names before the token: telling someone to create a token for a start that is refused anyway wastes a trip.
        self.check_names()
        if existing_token(workspace):
            return TokenSource(workspace)
        if not loopback:
            raise ExposureRefused(
                f"listening on {self.host} needs a token that already exists, and there is none: run "
                f"`lora-mcp token --workspace {workspace}` on this machine (it creates {token_path(workspace)}, "
                f"owner-only) or set {TOKEN_ENV}, give that token to your clients, then start again."
            )
        write_new_token(workspace)
        return TokenSource(workspace)

    def security_settings(self) -> TransportSecuritySettings:
        """The Host and Origin values clients may send: loopback names, the address listened on when it is a
        specific one, and every --allowed-host."""
        names = list(LOOPBACK_NAMES)
        host = self.host.strip("[]")
        listened = f"[{host}]" if ":" in host else host
        if not is_wildcard(host) and listened not in names:  # e.g. 10.0.0.5, or 127.0.0.2 (loopback too)
            names.append(listened)
        names += list(self.allowed_hosts)
        hosts = [pattern for name in names for pattern in (name, f"{name}:*")]
        origins = [f"{scheme}://{pattern}" for scheme in ("http", "https") for pattern in hosts]
        return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)

    def check_names(self) -> None:
        if is_wildcard(self.host) and not self.allowed_hosts:
            raise ExposureRefused(
                f"listening on every address ({self.host or 'all'}) needs --allowed-host NAME for each name or "
                "address clients use to reach this machine (e.g. --allowed-host gpu-box.lan --allowed-host "
                "10.0.0.5): requests naming any other host are refused, which is what stops DNS rebinding."
            )


# --- the guard -------------------------------------------------------------------------------------
@dataclass
class BadTokenLimit:
    """Counts wrong tokens per client address; BAD_TOKEN_LIMIT of them within
    BAD_TOKEN_WINDOW_S lock that address out for LOCKOUT_S.

    Both tables are kept in the order of their last change (an address that fails again moves to the end), so
    the expired entries are always at the front and each call drops just those. Neither holds more than
    MAX_TRACKED addresses: past that (guesses from thousands of addresses, e.g. an IPv6 block) the oldest
    are forgotten rather than memory growing without bound."""

    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, deque] = field(default_factory=dict)
    _locked_until: dict[str, float] = field(default_factory=dict)

    def locked_for(self, address: str) -> float:
        """Seconds this address stays locked out (0 when it is not)."""
        now = self.clock()
        self._forget_expired(now)
        until = self._locked_until.get(address)
        return 0.0 if until is None else until - now

    def failed(self, address: str) -> None:
        now = self.clock()
        self._forget_expired(now)
        recent = self._failures.pop(address, None) or deque(maxlen=BAD_TOKEN_LIMIT)
        self._failures[address] = recent  # to the end: the most recently failed
        recent.append(now)
        while now - recent[0] > BAD_TOKEN_WINDOW_S:
            recent.popleft()
        if len(recent) >= BAD_TOKEN_LIMIT:
            del self._failures[address]
            self._locked_until.pop(address, None)
            self._locked_until[address] = now + LOCKOUT_S
            log.warning("%d bad tokens from %s within %.0f s: refusing it for %.0f s", BAD_TOKEN_LIMIT, address,
                        BAD_TOKEN_WINDOW_S, LOCKOUT_S)
        for tracked in (self._failures, self._locked_until):
            while len(tracked) > MAX_TRACKED:
                del tracked[next(iter(tracked))]

    def _forget_expired(self, now: float) -> None:
        failures, locked = self._failures, self._locked_until
        while failures and now - failures[oldest := next(iter(failures))][-1] > BAD_TOKEN_WINDOW_S:
            del failures[oldest]
        while locked and locked[oldest := next(iter(locked))] <= now:
            del locked[oldest]


def client_address(request: Request) -> str:
    """The TCP peer's address: uvicorn runs without proxy_headers, so X-Forwarded-For (which anyone may send)
    never picks the address a bad token is counted against."""
    return request.client.host if request.client else "unknown"


def lower_case_names(scope: Scope) -> Scope:
    """The scope with its Host and Origin headers in lower case, for our check and the SDK's on /mcp: host
    names are case-insensitive (RFC 9110), and both checks compare strings."""
    headers = [(key, value.lower() if key in (b"host", b"origin") else value) for key, value in scope["headers"]]
    return {**scope, "headers": headers}


class Door(Enum):
    """How a path is entered."""

    BEARER = "bearer"  # the API, MCP and file routes: the bearer header only
    PUBLIC = "public"  # the login form's POST and the dashboard's static files (no data in them)
    PAGE = "page"  # a dashboard page: the session cookie, else the login form
    DATA = "data"  # the dashboard's JSON, files, events and actions: the session cookie, else 401 JSON


DASHBOARD_DATA = ("/dashboard/api/", "/dashboard/files/", "/dashboard/events", "/dashboard/logout")
# The public file paths: one plain name under /dashboard/assets/, as its route takes it. Exact, so that a path
# such as /dashboard/assets/../api/jobs, which a client may send as it is, is never public.
PUBLIC_ASSET = re.compile(r"/dashboard/assets/[A-Za-z0-9_][A-Za-z0-9_.-]*")  # no dot first: not . nor ..


def door(path: str) -> Door:
    """How `path` is entered: the scope's path, the very string the router matches (not request.url's)."""
    if path.split("/")[1] not in ("", "dashboard"):  # neither / nor /dashboard[/...]
        return Door.BEARER
    if path == "/dashboard/login" or PUBLIC_ASSET.fullmatch(path):
        return Door.PUBLIC
    return Door.DATA if path.startswith(DASHBOARD_DATA) else Door.PAGE


def login_required() -> Response:
    return error_response(401, "log in at /")


class AccessGuard:
    """ASGI middleware in front of every route: Host/Origin first (421/403), then, by the path's `door`, the
    bearer token (the address's lockout 429, then 401) or the dashboard's session cookie (the login form, or
    401 JSON for data). With `token=None` (--no-auth, loopback only) only Host/Origin apply. Websockets are
    refused outright (no route takes one), and each refusal is logged. `sessions` and `limit` are shared with
    the dashboard's login route; `login_page` answers a dashboard page asked for without a valid cookie."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: TokenSource | None,
        security: TransportSecuritySettings,
        sessions: Sessions | None = None,
        limit: BadTokenLimit | None = None,
        login_page: Callable[[], Response] = login_required,
    ):
        self.app = app
        self.token = token
        self.names = TransportSecurityMiddleware(security)
        self.sessions = sessions or Sessions(token)
        self.limit = limit or BadTokenLimit()
        self.login_page = login_page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # no route takes one: refused before any check (uvicorn answers 403)
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # the lifespan
            await self.app(scope, receive, send)
            return
        scope = lower_case_names(scope)
        request = Request(scope)
        entry = door(scope["path"])
        if entry is not Door.BEARER:
            send = with_headers(send, DASHBOARD_HEADERS if entry is Door.PUBLIC else DASHBOARD_HEADERS | NO_STORE)
        if refused := await self.names.validate_request(request, is_post=False):
            reason = "Host" if refused.status_code == 421 else "Origin"
            response = error_response(
                refused.status_code,
                f"this server does not answer to the {reason} {request.headers.get(reason.lower())!r}: use the "
                "name it was started for, or start it with --allowed-host NAME",
            )
        elif entry is Door.BEARER:
            response = self._check_token(request) if self.token is not None else None
        elif entry is Door.PUBLIC:
            response = None
        elif session := self.sessions.session_of(request):
            scope[SESSION_SCOPE_KEY] = session
            response = None
        else:
            response = self.login_page() if entry is Door.PAGE else login_required()
        if response is not None:
            # Only refusals are logged (uvicorn's line per request is off): the path without its query string,
            # which may hold a token, and never the token itself.
            log.log(logging.INFO if response.status_code == 401 else logging.WARNING, "refused %s %s from %s: %d",
                    request.method, request.url.path, client_address(request), response.status_code)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check_token(self, request: Request) -> JSONResponse | None:
        address = client_address(request)
        if waited := self.limit.locked_for(address):
            return error_response(
                429,
                f"too many wrong tokens from {address}: try again in {waited:.0f} s with the token "
                "`lora-mcp token` shows on the server",
                {"Retry-After": str(int(waited) + 1)},
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.sessions.token_is(given.strip()):
            return None
        if given:
            # Only guesses count: a client that sends no token cannot find the right one, and counting it would
            # let one misconfigured local client lock every other client of 127.0.0.1 out.
            self.limit.failed(address)
            what = "a wrong token"
        elif any(key.lower() in ("token", "access_token") for key in request.query_params):
            what = "its token in the URL, where it is never read"
        else:
            what = "no 'Authorization: Bearer <token>' header"
        return error_response(
            401,
            f"this server needs a token and the request had {what}. Send the header 'Authorization: Bearer "
            "<token>' (never in the URL); `lora-mcp token` on the server shows the token.",
            {"WWW-Authenticate": "Bearer"},
        )


def with_headers(send: Send, headers: dict[str, str]) -> Send:
    """`send` adding `headers` to the response's start (a route's own value of the same header is kept)."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            present = MutableHeaders(scope=message)
            for name, value in headers.items():
                present.setdefault(name, value)
        await send(message)

    return sending
