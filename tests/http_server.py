"""`lora-mcp http` as a real child process on a free loopback port, for the HTTP tests and benches, and the
client side the tests share: its JSON API, an upload's payload, a dashboard session and its event stream."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

SERVING = re.compile(r"lora-mcp http: serving (https?://\S+) ")


@dataclass
class HttpServer:
    url: str  # e.g. http://127.0.0.1:40123 (no trailing slash)
    token: str | None  # None for a --no-auth server
    workspace: Path
    process: subprocess.Popen
    log: Path  # the server's stderr

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def start_http_server(
    workspace: Path,
    *args: str,
    env: dict[str, str] | None = None,
    python_flags: tuple[str, ...] = (),
    timeout: float = 60,
) -> HttpServer:
    """Start `lora-mcp http --port 0` on `workspace` (extra `args` appended; `python_flags` such as
    ("-X", "importtime") go to the interpreter) and wait until it says where it serves. Built-in models are read from the test session's workspace through a `models` link."""
    workspace.mkdir(parents=True, exist_ok=True)
    shared_models = Path(os.environ["LORA_MCP_HOME"]) / "models"
    if not (workspace / "models").exists() and shared_models.is_dir() and workspace / "models" != shared_models:
        (workspace / "models").symlink_to(shared_models, target_is_directory=True)
    log = workspace / "http-server.stderr"
    environment = {**os.environ, "LORA_MCP_HOME": str(workspace)}
    environment.pop("LORA_MCP_TOKEN", None)  # the token comes from the workspace's file unless `env` gives one
    environment.update(env or {})
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, *python_flags, "-m", "server.main", "http", "--port", "0", "--workspace", str(workspace), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=environment,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if match := SERVING.search(text):
            token_file = workspace / "http-token"
            token = None
            if "--no-auth" not in args:
                token = environment.get("LORA_MCP_TOKEN") or token_file.read_text().strip()
            return HttpServer(match.group(1), token, workspace, process, log)
        if process.poll() is not None:
            raise RuntimeError(f"lora-mcp http exited with {process.returncode}:\n{text}")
        time.sleep(0.1)
    process.kill()
    process.wait(timeout=15)  # reaped: no zombie, and the stderr file is complete for the message below
    raise RuntimeError(f"lora-mcp http did not start within {timeout} s:\n{log.read_text(errors='replace')}")


# --- talking to it as the tests do -------------------------------------------------------------------------
def call_tool(server: HttpServer, tool: str, **arguments) -> dict:
    """A tool through the JSON API (POST /mcp/tool) with the bearer token: its result, after a 200."""
    answer = httpx.post(f"{server.url}/mcp/tool", json={"tool": tool, "arguments": arguments}, headers=server.headers,
                        timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()["result"]


def upload_images(folder: Path) -> list[dict]:
    """upload-dataset's `images` for the .png files of `folder`, each with the caption of its .txt."""
    return [
        {"filename": image.name, "content": base64.b64encode(image.read_bytes()).decode(),
         "caption": image.with_suffix(".txt").read_text().strip()}
        for image in sorted(folder.glob("*.png"))
    ]


def dashboard_client(server: HttpServer, address: str = "127.0.0.1") -> httpx.Client:
    """An httpx client without the bearer header, as a browser is; `address` is the loopback address it connects from
    (the bad-token lockout counts per address: tests that guess use their own)."""
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=server.url, transport=transport, follow_redirects=False, timeout=60)


def logged_in(server: HttpServer, address: str = "127.0.0.1") -> httpx.Client:
    """A dashboard client that logged in with the token through the login form's POST."""
    client = dashboard_client(server, address)
    answer = client.post("/dashboard/login", data={"token": server.token})
    assert answer.status_code == 303 and answer.headers["location"] == "/", answer.text
    return client


def csrf_token(client: httpx.Client) -> str:
    """The CSRF token the dashboard's page gives a logged-in client (its actions need it in X-CSRF-Token)."""
    page = client.get("/").text
    return page.split('<meta name="csrf-token" content="', 1)[1].split('"', 1)[0]


def events(stream: httpx.Response) -> Iterator[tuple[str, dict]]:
    """The (event, data) pairs of a server-sent event stream (an httpx streamed response), as they arrive (pings
    skipped)."""
    name, data = "", []
    for line in stream.iter_lines():
        if line.startswith("event:"):
            name = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:"):].strip())
        elif not line and data:
            yield name, json.loads("\n".join(data))
            name, data = "", []
