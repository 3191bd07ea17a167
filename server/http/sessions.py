"""The dashboard's login: a stateless session cookie and the CSRF token of its action routes.

The cookie is `<session_id>.<expires>.<mac>`, the MAC an HMAC-SHA256 of `<session_id>.<expires>` keyed by the
server's current token. Nothing is stored on the server: a cookie is valid while its MAC matches the token of
now and its expiry (7 days after login) has not passed, so `lora-mcp token --rotate` logs every browser out at
once. The CSRF token of a session is HMAC(token, "csrf:" + session_id): the page carries it in a meta tag, an
action sends it back in the X-CSRF-Token header, which a page of another site cannot read nor set.

Log-out clears this browser's cookie only: a copy of it (taken from the browser or its disk) stays valid until
it expires, 7 days after login, unless `lora-mcp token --rotate` is run. Served with --ssl-certfile the cookie
is `__Host-lora_mcp_session`, marked Secure (sent over https only) and bound to this host with no Domain. Behind
a TLS proxy the server sees plain http, so the cookie is `lora_mcp_session` and not marked Secure: serve TLS
with --ssl-certfile for that.

With --no-auth (loopback only) there is no login: every request is the one session NO_AUTH_SESSION, and the
CSRF key is random per process (a page of another site still cannot make actions).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

if TYPE_CHECKING:  # access.py's guard imports this module
    from server.http.access import TokenSource

SESSION_COOKIE = "lora_mcp_session"
# Under TLS: the __Host- prefix makes a browser take the cookie only with Secure, Path=/ and no Domain, so
# neither a sibling subdomain nor a plain-http page can set or replace it.
TLS_SESSION_COOKIE = "__Host-lora_mcp_session"
SESSION_LIFETIME_S = 7 * 24 * 3600  # a week: people look at long trainings for days, and rotation ends it sooner
CSRF_HEADER = "x-csrf-token"
NO_AUTH_SESSION = "local"
SESSION_ID_BYTES = 16  # 128 random bits: unguessable, and the CSRF token differs per login


class Sessions:
    """Issues and checks session cookies and CSRF tokens; `token` None is --no-auth."""

    def __init__(self, token: TokenSource | None, clock: Callable[[], float] = time.time):
        self.token = token
        self.clock = clock
        self._no_auth_key = secrets.token_bytes(32)

    @property
    def open(self) -> bool:
        """--no-auth: no login, every request is NO_AUTH_SESSION."""
        return self.token is None

    def _key(self) -> bytes | None:
        if self.token is None:
            return self._no_auth_key
        current = self.token.current()
        return current.encode() if current else None  # no token (file removed): no session is valid

    def _mac(self, key: bytes, message: str) -> str:
        return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()

    def token_is(self, given: str) -> bool:
        """Whether `given` is the server's token now (compare_digest: the time taken does not reveal how much
        of a guess was right)."""
        expected = self.token.current() if self.token is not None else None
        return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())

    def issue(self) -> str | None:
        """A new session cookie's value, or None when the server has no token to sign it with."""
        if (key := self._key()) is None:
            return None
        payload = f"{secrets.token_urlsafe(SESSION_ID_BYTES)}.{int(self.clock()) + SESSION_LIFETIME_S}"
        return f"{payload}.{self._mac(key, payload)}"

    def session_of(self, request: Request) -> str | None:
        """The session id of the request's cookie when it is valid now, else None."""
        if self.open:
            return NO_AUTH_SESSION
        session_id, _, rest = request.cookies.get(cookie_name(tls=is_tls(request)), "").partition(".")
        expires, _, mac = rest.partition(".")
        key = self._key()
        if key is None or not session_id or not expires.isdigit() or int(expires) <= self.clock():
            return None
        expected = self._mac(key, f"{session_id}.{expires}")
        return session_id if hmac.compare_digest(mac.encode(), expected.encode()) else None

    def csrf_token(self, session_id: str) -> str:
        key = self._key()
        return self._mac(key, f"csrf:{session_id}") if key else ""

    def csrf_ok(self, session_id: str, request: Request) -> bool:
        expected = self.csrf_token(session_id)
        given = request.headers.get(CSRF_HEADER, "")
        return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def is_tls(request: Request) -> bool:
    """Whether this server serves the request over TLS itself (--ssl-certfile): uvicorn runs without
    proxy_headers, so behind a TLS proxy this is False."""
    return request.url.scheme == "https"


def cookie_name(*, tls: bool) -> str:
    return TLS_SESSION_COOKIE if tls else SESSION_COOKIE


def set_session_cookie(response: Response, value: str, *, tls: bool) -> None:
    """HttpOnly: no script reads it; SameSite=Strict: no other site's page sends it; under TLS Secure, with the
    __Host- name and no Domain."""
    response.set_cookie(cookie_name(tls=tls), value, max_age=SESSION_LIFETIME_S, path="/", httponly=True,
                        samesite="strict", secure=tls)


def clear_session_cookie(response: Response, *, tls: bool) -> None:
    response.delete_cookie(cookie_name(tls=tls), path="/", httponly=True, samesite="strict", secure=tls)
