"""Who may use `lora-mcp http` (issue 13, "Authentication and exposure"): the security battery against a
real server (each bad request gets its status and a message that says what was wrong and what to do,
changes nothing on disk, and the server keeps answering), the bad-token lockout, the exposure refusals
before anything binds, `lora-mcp token [--rotate]`, and the rules behind them (BadTokenLimit, Exposure)."""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import requests
from http_server import HttpServer, logged_in, start_http_server
from requests.adapters import HTTPAdapter

from server.http.access import (
    BAD_TOKEN_LIMIT,
    BAD_TOKEN_WINDOW_S,
    LOCKOUT_S,
    MAX_TRACKED,
    TOKEN_ENV,
    AccessGuard,
    BadTokenLimit,
    Door,
    Exposure,
    door,
    is_loopback,
)
from server.main import LOG_FILE_BYTES, log_file

REPO = Path(__file__).resolve().parent.parent
TAKEN_CONFIG = "battery-taken"
JSON_BODY = {"Content-Type": "application/json"}


# --- helpers -----------------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    message: str  # the JSON error's message ("" for a success)
    headers: dict[str, str]

    @classmethod
    def of(cls, response: requests.Response) -> Answer:
        return cls(response.status_code, _message(response.json()), {k.lower(): v for k, v in response.headers.items()})


def _message(body: dict) -> str:
    return body.get("error", {}).get("message", "") if isinstance(body, dict) else ""


class FromAddress(HTTPAdapter):
    """Requests sent from another loopback address (Linux answers on all of 127.0.0.0/8). The bad-token limit
    counts per address, so wrong tokens a test sends from here never lock out 127.0.0.1, which other tests
    of the shared server use."""

    def __init__(self, address: str):
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, source_address=(self.address, 0), **kwargs)


def client_from(address: str) -> requests.Session:
    session = requests.Session()
    session.mount("http://", FromAddress(address))
    return session


def snapshot(workspace: Path) -> dict[str, tuple[int, int]]:
    """Every file under the workspace with its size and mtime, but the server's logs (its stderr file and
    logs/server.log grow with each request), SQLite's WAL side files (the job table's journal, which the
    job monitor may checkpoint at any time) and the empty lock files of server/name_locks.py."""
    churn = {"http-server.stderr", "state.db-wal", "state.db-shm"}
    return {
        path.relative_to(workspace).as_posix(): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in workspace.rglob("*")
        if path.is_file() and path.name not in churn and not {"logs", "locks"} & set(path.relative_to(workspace).parts)
    }


def declared_but_not_sent(server: HttpServer, declared: int) -> Answer:
    """POST /mcp/tool declaring `declared` bytes of body and sending a few: a 413 must come before the body."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.putrequest("POST", "/mcp/tool")
        for key, value in {**server.headers, **JSON_BODY, "Content-Length": str(declared)}.items():
            connection.putheader(key, value)
        connection.endheaders()
        connection.send(b'{"tool": "list-configs", "arguments": {"padding": "')
        response = connection.getresponse()
        headers = {key.lower(): value for key, value in response.getheaders()}
        return Answer(response.status, _message(json.loads(response.read())), headers)
    finally:
        connection.close()


def call(server: HttpServer, body) -> Answer:
    """POST /mcp/tool with `body` (bytes, an iterator of bytes sent chunked, or JSON to encode) and the token."""
    data = body if isinstance(body, bytes | Iterator) else json.dumps(body).encode()
    headers = {**server.headers, **JSON_BODY}
    return Answer.of(requests.post(f"{server.url}/mcp/tool", data=data, headers=headers, timeout=60))


def still_answers(server: HttpServer) -> None:
    response = requests.get(f"{server.url}/mcp/tools", headers=server.headers, timeout=60)
    assert response.status_code == 200, response.text
    assert any(tool["name"] == "get-training-status" for tool in response.json()["tools"])


# --- the security battery on the shared server -------------------------------------------------------
@dataclass(frozen=True)
class Case:
    send: Callable[[HttpServer], Answer]
    status: int
    says: tuple[str, ...]  # what was wrong and what to do, each in the message


def _get(server: HttpServer, path: str, headers: dict[str, str], session=requests) -> Answer:
    return Answer.of(session.get(f"{server.url}{path}", headers=headers, timeout=60))


INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
MCP_ACCEPT = {"Accept": "application/json, text/event-stream", **JSON_BODY}
SEND_THE_HEADER = "Send the header 'Authorization: Bearer <token>'"

BATTERY = {
    "no token": Case(
        lambda s: _get(s, "/mcp/tools", {}),
        401,
        ("no 'Authorization: Bearer <token>' header", SEND_THE_HEADER, "`lora-mcp token`"),
    ),
    "wrong token": Case(
        lambda s: _get(s, "/mcp/tools", {"Authorization": "Bearer not-the-token"}, client_from("127.0.0.2")),
        401,
        ("a wrong token", "`lora-mcp token` on the server shows the token"),
    ),
    "token in ?token=": Case(
        lambda s: _get(s, f"/mcp/tools?token={s.token}", {}),
        401,
        ("in the URL, where it is never read", SEND_THE_HEADER),
    ),
    "token in ?access_token=": Case(
        lambda s: _get(s, f"/mcp/tools?access_token={s.token}", {}), 401, ("in the URL", SEND_THE_HEADER)
    ),
    "foreign Host": Case(
        lambda s: _get(s, "/mcp/tools", {**s.headers, "Host": "evil.example"}),
        421,
        ("does not answer to the Host 'evil.example'", "--allowed-host NAME"),
    ),
    "foreign Origin": Case(
        lambda s: _get(s, "/mcp/tools", {**s.headers, "Origin": "http://evil.example"}),
        403,
        ("does not answer to the Origin 'http://evil.example'", "--allowed-host NAME"),
    ),
    "20 GB declared": Case(
        lambda s: declared_but_not_sent(s, 20 * 10**9),
        413,
        ("the request body is over", "LORA_MCP_MAX_REQUEST_MB", "POST a zip to /datasets/<name>"),
    ),
    "malformed JSON": Case(lambda s: call(s, b'{"tool": "list-configs",'), 400, ("not valid JSON", '{"tool": NAME')),
    "a JSON array": Case(
        lambda s: call(s, ["list-configs"]), 400, ("must be a JSON object", "Input should be an object")
    ),
    "no tool": Case(lambda s: call(s, {"arguments": {}}), 400, ("must be a JSON object", "tool: Field required")),
    "unknown key": Case(
        lambda s: call(s, {"tool": "list-configs", "args": {}}), 400, ("args: Extra inputs are not permitted",)
    ),
    "unknown tool": Case(
        lambda s: call(s, {"tool": "train-everything"}), 404, ("no tool 'train-everything'", "GET /mcp/tools lists")
    ),
    "wrong type": Case(
        lambda s: call(s, {"tool": "get-training-logs", "arguments": {"job_id": "abc", "lines": "abc"}}),
        422,
        ("get-training-logs refused its arguments: lines: Input should be a valid integer", "input_schema"),
    ),
    "out of range": Case(
        lambda s: call(s, {"tool": "get-training-logs", "arguments": {"job_id": "abc", "lines": 5000}}),
        422,
        ("lines: Input should be less than or equal to 1000", "input_schema"),
    ),
    "unknown job": Case(
        lambda s: call(s, {"tool": "get-training-status", "arguments": {"job_id": "no-such-job"}}),
        409,
        ("no job 'no-such-job'", "list-training-jobs"),
    ),
    "config name taken": Case(
        lambda s: call(s, {"tool": "create-training-config", "arguments": {"name": TAKEN_CONFIG, "dataset_path": "y"}}),
        409,
        (f"config '{TAKEN_CONFIG}' already exists", "update-training-config", "delete-config"),
    ),
    "unknown path": Case(
        lambda s: _get(s, "/api/v1/tools", s.headers),
        404,
        ("there is no /api/v1/tools here", "GET /mcp/tools, POST /mcp/tool", "/mcp (MCP Streamable HTTP)",
         "GET /loras/{name}.safetensors", "POST /datasets/{name}"),
    ),
    "wrong method": Case(
        lambda s: _get(s, "/mcp/tool", s.headers), 405, ("/mcp/tool does not take GET", "POST /mcp/tool")
    ),
    "/mcp without a token": Case(
        lambda s: Answer.of(requests.post(f"{s.url}/mcp", json=INITIALIZE, headers=MCP_ACCEPT, timeout=60)),
        401,
        ("no 'Authorization: Bearer <token>' header",),
    ),
    "/mcp for a foreign Host": Case(
        lambda s: Answer.of(
            requests.post(
                f"{s.url}/mcp", json=INITIALIZE, headers={**s.headers, **MCP_ACCEPT, "Host": "evil.example"}, timeout=60
            )
        ),
        421,
        ("Host 'evil.example'",),
    ),
}


@pytest.fixture(scope="module")
def battery_server(http_server) -> HttpServer:
    """The shared server, with a config whose name the battery then tries to take again."""
    create = {"tool": "create-training-config", "arguments": {"name": TAKEN_CONFIG, "dataset_path": "x"}}
    answer = call(http_server, create)
    assert answer.status in (200, 409), answer  # 409: an earlier run of this module in the same session
    return http_server


@pytest.mark.parametrize("case", BATTERY.values(), ids=BATTERY.keys())
def test_security_battery(battery_server, case):
    before = snapshot(battery_server.workspace)
    answer = case.send(battery_server)
    assert answer.status == case.status, answer
    for words in case.says:
        assert words in answer.message, answer.message
    if answer.status == 401:
        assert answer.headers["www-authenticate"] == "Bearer"
    assert snapshot(battery_server.workspace) == before
    still_answers(battery_server)


def test_only_refusals_are_logged_and_never_a_token_in_the_url(battery_server):
    assert call(battery_server, {"tool": "list-configs"}).status == 200
    refused = _get(battery_server, f"/mcp/tools?x=1&token={battery_server.token}", {})
    assert refused.status == 401
    for log in (battery_server.log, battery_server.workspace / "logs" / "server.log"):
        text = log.read_text(errors="replace")
        assert "refused GET /mcp/tools from 127.0.0.1: 401" in text  # the address, the path without its query
        assert battery_server.token not in text and "x=1" not in text
        assert "POST /mcp/tool HTTP/1.1" not in text  # no line per request served


def test_the_server_log_rotates_at_its_size(tmp_path):
    handler = log_file(tmp_path)
    line = logging.LogRecord("server", logging.INFO, __file__, 1, "x" * 2**20, None, None)  # 1 MB a record
    try:
        for _ in range(LOG_FILE_BYTES // 2**20 * 5):  # five files' worth
            handler.emit(line)
    finally:
        handler.close()
    logs = tmp_path / "logs"
    assert {path.name for path in logs.iterdir()} == {"server.log", "server.log.1", "server.log.2", "server.log.3"}
    assert all(path.stat().st_size <= LOG_FILE_BYTES for path in logs.iterdir())


def test_host_and_origin_names_are_case_insensitive(http_server):
    name = f"LocalHost:{http_server.port}"
    headers = {**http_server.headers, "Host": name, "Origin": f"HTTP://{name}"}
    assert _get(http_server, "/mcp/tools", headers).status == 200
    initialize = {**INITIALIZE, "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                           "clientInfo": {"name": "test", "version": "1"}}}
    # /mcp: the SDK's transport checks Host and Origin again, on what AccessGuard passes on.
    opened = requests.post(f"{http_server.url}/mcp", json=initialize, headers={**headers, **MCP_ACCEPT}, timeout=60)
    assert opened.status_code == 200, opened.text
    session = {"mcp-session-id": opened.headers["mcp-session-id"]}
    assert requests.delete(f"{http_server.url}/mcp", headers={**headers, **session}, timeout=60).status_code == 200


def test_websocket_requests_are_refused_before_any_route():
    """No route takes a websocket; uvicorn turns the close before an accept into 403 (where it has a websocket
    library: this environment has none, hence the guard alone)."""
    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope)

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    guard = AccessGuard(app, token=None, security=Exposure("127.0.0.1", 8190, auth=False).security_settings())
    scope = {"type": "websocket", "path": "/mcp", "headers": [(b"host", b"127.0.0.1:8190")], "client": ("127.0.0.1", 1)}
    anyio.run(guard, scope, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}] and reached == []


def test_a_loopback_start_creates_an_owner_only_token_and_says_where(http_server):
    path = http_server.workspace / "http-token"
    assert path.read_text().strip() == http_server.token
    assert len(http_server.token) >= 43  # 32 random bytes
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == 0o600
    stderr = http_server.log.read_text(errors="replace")
    assert f"token in {path}" in stderr
    assert http_server.token not in stderr


# --- request size with a 1 MB limit ----------------------------------------------------------------
@pytest.fixture(scope="module")
def small_body_server(tmp_path_factory, tiny_sd15):
    server = start_http_server(tmp_path_factory.mktemp("http-1mb"), env={"LORA_MCP_MAX_REQUEST_MB": "1"})
    yield server
    server.stop()


def test_a_body_over_the_limit_is_refused_declared_or_streamed(small_body_server):
    body = json.dumps({"tool": "list-configs", "arguments": {"padding": "x" * 2 * 2**20}}).encode()  # 2 MB
    before = snapshot(small_body_server.workspace)
    declared = call(small_body_server, body)
    # No Content-Length (chunked): the limit is checked as the body streams in.
    streamed = call(small_body_server, (body[i : i + 2**16] for i in range(0, len(body), 2**16)))
    for answer in (declared, streamed):
        assert answer.status == 413, answer
        assert "the request body is over 1 MB (LORA_MCP_MAX_REQUEST_MB on the server)" in answer.message
    assert snapshot(small_body_server.workspace) == before
    assert call(small_body_server, {"tool": "list-configs"}).status == 200  # a body under the limit


# --- the lockout and the token's rotation, on a server of their own -----------------------------------
@pytest.fixture(scope="module")
def own_server(tmp_path_factory, tiny_sd15):
    """A server this module may lock out and whose token it may rotate (never the shared one)."""
    server = start_http_server(tmp_path_factory.mktemp("http-own"))
    yield server
    server.stop()


def test_ten_wrong_tokens_lock_the_address_out(own_server):
    attacker = client_from("127.0.0.3")
    for _ in range(BAD_TOKEN_LIMIT):
        assert _get(own_server, "/mcp/tools", {"Authorization": "Bearer guess"}, attacker).status == 401
    locked = _get(own_server, "/mcp/tools", own_server.headers, attacker)  # even the right token
    assert locked.status == 429, locked
    assert "too many wrong tokens from 127.0.0.3" in locked.message and "try again in" in locked.message
    assert 1 <= int(locked.headers["retry-after"]) <= LOCKOUT_S + 1
    # The lockout is the address's: another client with the right token is served.
    assert _get(own_server, "/mcp/tools", own_server.headers).status == 200


@pytest.fixture
def lockout_server(tmp_path, tiny_sd15):
    """A server whose 127.0.0.1 this test locks out."""
    server = start_http_server(tmp_path / "ws")
    yield server
    server.stop()


def test_x_forwarded_for_neither_dodges_nor_aims_the_lockout(lockout_server):
    """From 127.0.0.1, whose X-Forwarded-For uvicorn would trust by default: the guesses count against the
    connection's address, not the one the header names."""
    aimed = {"X-Forwarded-For": "127.0.0.7"}
    for _ in range(BAD_TOKEN_LIMIT):
        assert _get(lockout_server, "/mcp/tools", {"Authorization": "Bearer guess", **aimed}).status == 401
    for headers in (lockout_server.headers, {**lockout_server.headers, **aimed}):
        locked = _get(lockout_server, "/mcp/tools", headers)
        assert locked.status == 429 and "too many wrong tokens from 127.0.0.1" in locked.message, locked
    assert _get(lockout_server, "/mcp/tools", lockout_server.headers, client_from("127.0.0.7")).status == 200


def test_missing_tokens_do_not_lock_the_address_out(own_server):
    client = client_from("127.0.0.4")
    for _ in range(BAD_TOKEN_LIMIT + 2):
        assert _get(own_server, "/mcp/tools", {}, client).status == 401
    assert _get(own_server, "/mcp/tools", own_server.headers, client).status == 200


def lora_mcp_token(workspace: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != TOKEN_ENV} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "server.main", "token", "--workspace", str(workspace), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=environment,
        timeout=120,
    )


def test_rotating_the_token_takes_effect_on_a_running_server(own_server):
    """On the API's bearer header and on the dashboard's sessions, which the old token opened."""
    old = own_server.token
    assert _get(own_server, "/mcp/tools", own_server.headers).status == 200
    dashboard = logged_in(own_server)
    assert dashboard.get("/dashboard/api/jobs").status_code == 200
    shown = lora_mcp_token(own_server.workspace)
    assert shown.returncode == 0 and shown.stdout.strip() == old, shown.stderr

    rotated = lora_mcp_token(own_server.workspace, "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert new != old and new == (own_server.workspace / "http-token").read_text().strip()
    assert "running servers require it from their next request on" in rotated.stderr
    if os.name == "posix":
        assert (own_server.workspace / "http-token").stat().st_mode & 0o777 == 0o600

    refused = _get(own_server, "/mcp/tools", {"Authorization": f"Bearer {old}"})
    assert refused.status == 401 and "a wrong token" in refused.message
    assert _get(own_server, "/mcp/tools", {"Authorization": f"Bearer {new}"}).status == 200
    own_server.token = new
    # Every dashboard session ended with the old token: the cookie now gets the login, the new token a session.
    refused = dashboard.get("/dashboard/api/jobs")
    assert refused.status_code == 401 and refused.json() == {"error": {"message": "log in at /"}}
    assert dashboard.get("/").status_code == 401
    assert logged_in(own_server).get("/dashboard/api/jobs").status_code == 200


def test_token_prints_and_creates_it_once(tmp_path):
    workspace = tmp_path / "ws"
    first = lora_mcp_token(workspace)
    assert first.returncode == 0, first.stderr
    token = first.stdout.strip()
    assert len(token) >= 43 and token == (workspace / "http-token").read_text().strip()
    assert "new token written to" in first.stderr and token not in first.stderr
    if os.name == "posix":
        assert (workspace / "http-token").stat().st_mode & 0o777 == 0o600
    again = lora_mcp_token(workspace)
    assert again.returncode == 0 and again.stdout.strip() == token
    assert f"from {workspace / 'http-token'}" in again.stderr


@pytest.mark.skipif(os.name != "posix", reason="owner-only permissions are POSIX modes")
def test_a_token_file_others_may_read_is_refused_until_chmod_600(tmp_path):
    workspace = tmp_path / "ws"
    assert lora_mcp_token(workspace).returncode == 0
    path = workspace / "http-token"
    path.chmod(0o644)
    stderr = refused_start(workspace)
    assert f"the token file {path} may be read by other users" in stderr and f"`chmod 600 {path}`" in stderr
    shown = lora_mcp_token(workspace)
    assert shown.returncode == 2 and shown.stdout == "" and f"`chmod 600 {path}`" in shown.stderr
    rotated = lora_mcp_token(workspace, "--rotate")  # what the message suggests when it may have been read
    assert rotated.returncode == 0 and path.stat().st_mode & 0o777 == 0o600
    assert rotated.stdout.strip() == path.read_text().strip()


# --- LORA_MCP_TOKEN ------------------------------------------------------------------------------------
ENV_TOKEN = "env-token-for-the-access-tests-0123456789abcdef"


@pytest.fixture(scope="module")
def env_token_server(tmp_path_factory, tiny_sd15):
    server = start_http_server(tmp_path_factory.mktemp("http-env-token"), env={TOKEN_ENV: ENV_TOKEN})
    yield server
    server.stop()


def test_the_environment_token_is_the_one_required_and_no_file_is_made(env_token_server):
    assert env_token_server.token == ENV_TOKEN
    assert not (env_token_server.workspace / "http-token").exists()
    stderr = env_token_server.log.read_text(errors="replace")
    assert f"token in the {TOKEN_ENV} environment variable" in stderr and ENV_TOKEN not in stderr
    assert _get(env_token_server, "/mcp/tools", {"Authorization": f"Bearer {ENV_TOKEN}"}).status == 200
    wrong = _get(env_token_server, "/mcp/tools", {"Authorization": "Bearer env-token"}, client_from("127.0.0.5"))
    assert wrong.status == 401


def test_rotate_refuses_while_the_token_comes_from_the_environment(env_token_server):
    rotated = lora_mcp_token(env_token_server.workspace, "--rotate", env={TOKEN_ENV: ENV_TOKEN})
    assert rotated.returncode == 2 and rotated.stdout == ""
    assert f"the token comes from {TOKEN_ENV}; change it there" in rotated.stderr
    assert not (env_token_server.workspace / "http-token").exists()
    shown = lora_mcp_token(env_token_server.workspace, env={TOKEN_ENV: ENV_TOKEN})
    assert shown.returncode == 0 and shown.stdout.strip() == ENV_TOKEN
    assert _get(env_token_server, "/mcp/tools", {"Authorization": f"Bearer {ENV_TOKEN}"}).status == 200


# --- exposure: refused before anything binds -------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as client:
        return client.connect_ex(("127.0.0.1", port)) == 0


def refused_start(workspace: Path, *args: str) -> str:
    """Run `lora-mcp http` with `args` on a free port: it must exit 2 with nothing ever listening on that port,
    having written nothing but its log (no services opened, so no job table: refused before the app was
    built, let alone bound). Returns its stderr."""
    workspace.mkdir(parents=True, exist_ok=True)
    before = {path.relative_to(workspace).as_posix() for path in workspace.rglob("*")}
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "server.main", "http", "--workspace", str(workspace), "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={key: value for key, value in os.environ.items() if key != TOKEN_ENV},
    )
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            assert not listening(port)
            time.sleep(0.05)
        stderr = process.communicate(timeout=60)[1]
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 2, stderr
    assert not listening(port)
    assert "serving" not in stderr
    after = {path.relative_to(workspace).as_posix() for path in workspace.rglob("*")}
    assert after == before | {"logs", "logs/server.log"}
    return stderr


@pytest.mark.parametrize(
    "args",
    [("--host", "0.0.0.0", "--allowed-host", "gpu-box.lan"), ("--host", "10.0.0.5")],
    ids=["every address", "one address"],
)
def test_listening_off_loopback_needs_a_token_that_exists(tmp_path, args):
    stderr = refused_start(tmp_path / "ws", *args)
    assert f"listening on {args[1]} needs a token that already exists, and there is none" in stderr
    assert "`lora-mcp token --workspace" in stderr and TOKEN_ENV in stderr
    assert not (tmp_path / "ws" / "http-token").exists()


@pytest.mark.parametrize("names", [(), ("--allowed-host", "gpu-box.lan")], ids=["no names", "with a name"])
def test_no_auth_is_refused_off_loopback(tmp_path, names):
    stderr = refused_start(tmp_path / "ws", "--no-auth", "--host", "0.0.0.0", *names)
    assert "--no-auth is only for loopback addresses" in stderr and "Drop --no-auth" in stderr


@pytest.mark.parametrize("token_exists", [True, False], ids=["token exists", "no token yet"])
def test_every_address_needs_allowed_host_names(tmp_path, token_exists):
    workspace = tmp_path / "ws"
    if token_exists:
        assert lora_mcp_token(workspace).returncode == 0
    stderr = refused_start(workspace, "--host", "0.0.0.0")
    assert "listening on every address (0.0.0.0) needs --allowed-host NAME" in stderr
    assert "stops DNS rebinding" in stderr


# --- the rules, with an injected clock ------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bad_token_limit_locks_at_the_tenth_failure_within_the_window():
    clock = Clock()
    limit = BadTokenLimit(clock=clock)
    for _ in range(BAD_TOKEN_LIMIT - 1):
        limit.failed("10.0.0.9")
        clock.now += 1
    assert limit.locked_for("10.0.0.9") == 0
    limit.failed("10.0.0.9")
    assert limit.locked_for("10.0.0.9") == LOCKOUT_S
    assert limit.locked_for("10.0.0.8") == 0  # per address


def test_bad_token_limit_forgets_failures_older_than_the_window():
    clock = Clock()
    limit = BadTokenLimit(clock=clock)
    for _ in range(BAD_TOKEN_LIMIT - 1):
        limit.failed("10.0.0.9")
    clock.now += BAD_TOKEN_WINDOW_S + 1
    limit.failed("10.0.0.9")  # the tenth, but the nine others are over a minute old
    assert limit.locked_for("10.0.0.9") == 0


def test_bad_token_lockout_expires_and_counting_starts_again():
    clock = Clock()
    limit = BadTokenLimit(clock=clock)
    for _ in range(BAD_TOKEN_LIMIT):
        limit.failed("10.0.0.9")
    clock.now += LOCKOUT_S - 5
    assert limit.locked_for("10.0.0.9") == 5
    clock.now += 5
    assert limit.locked_for("10.0.0.9") == 0
    limit.failed("10.0.0.9")  # one more guess after the lockout does not lock again
    assert limit.locked_for("10.0.0.9") == 0


def test_bad_token_limit_forgets_expired_failures_and_lockouts():
    clock = Clock()
    limit = BadTokenLimit(clock=clock)
    for address in ("10.0.0.1", "10.0.0.2"):
        for _ in range(BAD_TOKEN_LIMIT):
            limit.failed(address)
    limit.failed("10.0.0.3")
    clock.now += max(LOCKOUT_S, BAD_TOKEN_WINDOW_S) + 1
    limit.failed("10.0.0.4")
    assert list(limit._failures) == ["10.0.0.4"] and limit._locked_until == {}


def test_bad_token_limit_tracks_at_most_max_tracked_addresses():
    limit = BadTokenLimit(clock=Clock())  # a clock that stands still: nothing ever expires
    guessed_once = [f"fd00::a:{n:x}" for n in range(MAX_TRACKED + 100)]
    locked_out = [f"fd00::b:{n:x}" for n in range(MAX_TRACKED + 100)]
    for address in guessed_once:
        limit.failed(address)
    for address in locked_out:
        for _ in range(BAD_TOKEN_LIMIT):
            limit.failed(address)
    assert len(limit._failures) <= MAX_TRACKED and len(limit._locked_until) <= MAX_TRACKED
    assert limit.locked_for(locked_out[-1]) == LOCKOUT_S  # the newest are kept, the oldest forgotten
    assert limit.locked_for(locked_out[0]) == 0


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("10.0.0.5", False), ("gpu-box.lan", False), ("localhost.evil.example", False)],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_loopback_names_are_always_allowed_and_nothing_else_by_default():
    settings = Exposure("127.0.0.1", 8190, auth=True).security_settings()
    assert settings.enable_dns_rebinding_protection
    for name in ("127.0.0.1", "localhost", "[::1]"):
        assert {name, f"{name}:*"} <= set(settings.allowed_hosts)
        assert {f"http://{name}:*", f"https://{name}:*"} <= set(settings.allowed_origins)
    assert not any("evil" in host or "0.0.0.0" in host for host in settings.allowed_hosts)


def test_the_address_listened_on_and_allowed_hosts_are_allowed_names():
    wildcard = Exposure("0.0.0.0", 8190, auth=True, allowed_hosts=("gpu-box.lan", "10.0.0.5")).security_settings()
    assert {"gpu-box.lan:*", "10.0.0.5:*"} <= set(wildcard.allowed_hosts)
    assert "http://gpu-box.lan:*" in wildcard.allowed_origins
    assert not any(host.startswith("0.0.0.0") for host in wildcard.allowed_hosts)
    assert "10.0.0.7:*" in Exposure("10.0.0.7", 8190, auth=True).security_settings().allowed_hosts
    assert "[fd00::7]:*" in Exposure("fd00::7", 8190, auth=True).security_settings().allowed_hosts
    # A loopback address other than 127.0.0.1 is reached by its own name too.
    assert "127.0.0.2:*" in Exposure("127.0.0.2", 8190, auth=True).security_settings().allowed_hosts
    ipv6 = Exposure("::1", 8190, auth=True).security_settings().allowed_hosts
    assert ipv6.count("[::1]:*") == 1


@pytest.mark.parametrize(
    ("path", "entry"),
    [
        ("/dashboard/assets/app.js", Door.PUBLIC),
        ("/dashboard/login", Door.PUBLIC),
        ("/dashboard/assets/../api/jobs", Door.PAGE),
        ("/dashboard/assets/..", Door.PAGE),
        ("/dashboard/assets/.hidden", Door.PAGE),
        ("/dashboard/assets/scripts/app.js", Door.PAGE),
        ("/dashboard/assets/", Door.PAGE),
        ("/dashboard/api/jobs", Door.DATA),
        ("/mcp/tools", Door.BEARER),
    ],
)
def test_only_one_plain_name_under_the_assets_is_public(path, entry):
    assert door(path) is entry


def test_a_path_out_of_the_assets_is_not_public(http_server):
    """http.client sends the path as written (httpx and browsers would normalise the dots away): the guard judges
    the very path the router gets, and without a cookie that is the login form, not a public route."""
    answers = {}
    for path in ("/dashboard/assets/../api/jobs", "/dashboard/assets/app.js"):
        connection = http.client.HTTPConnection("127.0.0.1", http_server.port, timeout=60)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            answers[path] = (response.status, response.getheader("content-type"), response.read())
        finally:
            connection.close()
    status, kind, body = answers["/dashboard/assets/../api/jobs"]
    assert status == 401 and kind.startswith("text/html") and b'name="token"' in body
    assert answers["/dashboard/assets/app.js"][0] == 200
