"""The web dashboard's routes on `lora-mcp http` (the pages and scripts are in server/dashboard_assets/).

    GET  /, /dashboard/jobs/{job_id}, /dashboard/datasets, /dashboard/datasets/{name}
                                      the page (shell.html; body[data-page] says which, the scripts fetch the rest)
    POST /dashboard/login             form field `token`: 303 to / with the session cookie, or the form again
    POST /dashboard/logout            clears the cookie
    GET  /dashboard/api/jobs[/{job_id}], /dashboard/api/datasets[/{name}]
                                      the views of server/dashboard_views.py as JSON
    POST /dashboard/api/jobs/{job_id}/stop, .../resume
                                      what stop-training / resume-training do; answers the job's status
    GET  /dashboard/files/samples/{job_id}/{filename}, /dashboard/files/thumbnails/{dataset}/{filename}
    GET  /dashboard/events            server-sent events: `job` with a JobRow whenever the job monitor sees a change
    GET  /dashboard/assets/{name}     the package's CSS and scripts (public: no data in them)

AccessGuard (server/http/access.py) lets a request through to these only with a valid session cookie (the
login and the assets excepted); the POSTs here also need the X-CSRF-Token header of the session. A failure
has the JSON API's error shape and status: 404 for an unknown job or dataset, 409 when the job's state
refuses the action, 422 for a name that cannot be taken.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import AsyncIterator, Callable
from string import Template
from urllib.parse import parse_qs

import anyio
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from server.dashboard_app import ASSETS
from server.dashboard_views import DashboardViews
from server.errors import ServiceError, WorkspaceStateError
from server.http.access import SESSION_SCOPE_KEY, BadTokenLimit, client_address, error_response
from server.http.sessions import Sessions, clear_session_cookie, is_tls, set_session_cookie
from server.http.tool_api import BodyTooLarge, read_body
from server.tools import Services

log = logging.getLogger("server.http")

PING_S = 15  # a comment on the event stream this often keeps proxies and browsers from closing an idle one
LOGIN_BODY_BYTES = 4096  # a login form holds one token of 43 characters
ASSET_TYPES = {".css": "text/css", ".js": "text/javascript"}


class Dashboard:
    """The dashboard's routes over the tools' services; `sessions` and `limit` are AccessGuard's."""

    def __init__(self, services: Services, sessions: Sessions, limit: BadTokenLimit):
        self.services = services
        self.views = DashboardViews(services)
        self.sessions = sessions
        self.limit = limit
        self.shell = Template((ASSETS / "shell.html").read_text(encoding="utf-8"))
        self.login = Template((ASSETS / "login.html").read_text(encoding="utf-8"))

    def routes(self) -> list[Route]:
        view, action = self._view, self._action
        return [
            Route("/", self._page("jobs"), methods=["GET"]),
            Route("/dashboard/jobs/{job_id}", self._page("job"), methods=["GET"]),
            Route("/dashboard/datasets", self._page("datasets"), methods=["GET"]),
            Route("/dashboard/datasets/{name}", self._page("dataset"), methods=["GET"]),
            Route("/dashboard/login", self._log_in, methods=["POST"]),
            # A reload of the form's answer, or a bookmark: the form is at /.
            Route("/dashboard/login", lambda _request: RedirectResponse("/", status_code=303), methods=["GET"]),
            Route("/dashboard/logout", self._log_out, methods=["POST"]),
            Route("/dashboard/api/jobs", view(lambda _params: self.views.jobs()), methods=["GET"]),
            Route("/dashboard/api/jobs/{job_id}", view(lambda p: self.views.job(p["job_id"])), methods=["GET"]),
            Route("/dashboard/api/datasets", view(lambda _params: self.views.datasets()), methods=["GET"]),
            Route("/dashboard/api/datasets/{name}", view(lambda p: self.views.dataset(p["name"])), methods=["GET"]),
            Route("/dashboard/api/jobs/{job_id}/stop", action(self.services.jobs.stop), methods=["POST"]),
            Route("/dashboard/api/jobs/{job_id}/resume", action(self.services.jobs.resume), methods=["POST"]),
            Route("/dashboard/files/samples/{job_id}/{filename}", self._sample, methods=["GET"]),
            Route("/dashboard/files/thumbnails/{name}/{filename:path}", self._thumbnail, methods=["GET"]),
            Route("/dashboard/events", self._events, methods=["GET"]),
            Route("/dashboard/assets/{name}", self._asset, methods=["GET"]),
        ]

    # --- pages -------------------------------------------------------------------------------------
    def login_page(self, message: str = "", status: int = 401, headers: dict[str, str] | None = None) -> Response:
        """The login form, with `message` (escaped) above its button; nothing else of the server's."""
        return HTMLResponse(self.login.substitute(error=html.escape(message)), status_code=status, headers=headers)

    def _page(self, page: str) -> Callable:
        async def endpoint(request: Request) -> Response:
            params = request.path_params
            values = {
                "page": page,
                "job_id": params.get("job_id", ""),
                "dataset": params.get("name", ""),
                "csrf_token": self.sessions.csrf_token(request.scope[SESSION_SCOPE_KEY]),
            }
            return HTMLResponse(self.shell.substitute({key: html.escape(value) for key, value in values.items()}))

        return endpoint

    async def _log_in(self, request: Request) -> Response:
        if self.sessions.open:  # --no-auth: nothing to log in to
            return RedirectResponse("/", status_code=303)
        address = client_address(request)
        if waited := self.limit.locked_for(address):
            return self.login_page(f"Too many wrong tokens from {address}: try again in {waited:.0f} s.", 429,
                                   {"Retry-After": str(int(waited) + 1)})
        try:
            form = parse_qs((await read_body(request, LOGIN_BODY_BYTES)).decode("utf-8", "replace"))
        except (BodyTooLarge, ClientDisconnect):
            return self.login_page("That is not a token: paste the one `lora-mcp token` prints.", 400)
        given = form.get("token", [""])[0].strip()
        if given and self.sessions.token_is(given) and (cookie := self.sessions.issue()):
            response = RedirectResponse("/", status_code=303)
            set_session_cookie(response, cookie, tls=is_tls(request))
            return response
        if given:  # only guesses count, as for the bearer header
            self.limit.failed(address)
        log.info("refused a dashboard login from %s", address)
        return self.login_page("Wrong token: `lora-mcp token` on the server prints the right one.")

    async def _log_out(self, request: Request) -> Response:
        if refused := self._csrf_refusal(request):
            return refused
        response = JSONResponse({"result": {"logged_out": True}})
        clear_session_cookie(response, tls=is_tls(request))
        return response

    # --- data --------------------------------------------------------------------------------------
    def _view(self, build: Callable[[dict], BaseModel]) -> Callable:
        async def endpoint(request: Request) -> Response:
            try:
                view = await anyio.to_thread.run_sync(build, request.path_params)
            except ServiceError as exc:
                return _failure(exc, unknown=404)
            return JSONResponse(view.model_dump(mode="json"))

        return endpoint

    def _action(self, act: Callable[[str], object]) -> Callable:
        """A job action: the service call its tool makes, then the job's status, as the tool answers."""

        def run(job_id: str) -> BaseModel:
            act(job_id)
            return self.services.jobs.status(job_id)

        async def endpoint(request: Request) -> Response:
            if refused := self._csrf_refusal(request):
                return refused
            try:
                status = await anyio.to_thread.run_sync(run, request.path_params["job_id"])
            except ServiceError as exc:
                return _failure(exc, unknown=409)
            return JSONResponse(status.model_dump(mode="json"))

        return endpoint

    def _csrf_refusal(self, request: Request) -> Response | None:
        if self.sessions.csrf_ok(request.scope[SESSION_SCOPE_KEY], request):
            return None
        log.warning("refused %s %s from %s: no valid X-CSRF-Token", request.method, request.url.path,
                    client_address(request))
        return error_response(403, "this action needs the X-CSRF-Token header of the page's csrf-token meta tag: "
                              "reload the page and try again")

    async def _sample(self, request: Request) -> Response:
        params = request.path_params
        try:
            path = await anyio.to_thread.run_sync(
                self.services.training.sample_path, params["job_id"], params["filename"]
            )
        except ServiceError as exc:
            return _failure(exc, unknown=404)
        return FileResponse(path, media_type="image/png")

    async def _thumbnail(self, request: Request) -> Response:
        params = request.path_params
        try:
            jpeg = await anyio.to_thread.run_sync(self.views.thumbnail, params["name"], params["filename"])
        except ServiceError as exc:
            return _failure(exc, unknown=404)
        return Response(jpeg, media_type="image/jpeg")

    async def _events(self, _request: Request) -> Response:
        async def stream() -> AsyncIterator[dict]:
            with self.services.events.reader() as reader:
                async for event, data in reader:
                    yield {"event": event, "data": json.dumps(data)}

        return EventSourceResponse(stream(), ping=PING_S)

    async def _asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        path = ASSETS / name
        # Only the package's own stylesheets and scripts, by plain name: no other file, no path out of the folder.
        if "/" in name or "\\" in name or path.suffix not in ASSET_TYPES or not path.is_file():
            return error_response(404, f"there is no dashboard asset {name!r}")
        return FileResponse(path, media_type=ASSET_TYPES[path.suffix])


def _failure(exc: ServiceError, *, unknown: int) -> JSONResponse:
    """A service's refusal with its message: `unknown` for the workspace's state (404 for what a GET names,
    409 for an action the job's state refuses), 422 for a name or value that cannot be taken."""
    return error_response(unknown if isinstance(exc, WorkspaceStateError) else 422, str(exc))
