"""Other clients against `lora-mcp http`, as the README's "Remote GPU" section shows them: the MCP
Inspector's CLI, Claude Desktop's entry through the mcp-remote bridge (claude_desktop_config.remote.example.json,
driven here by the SDK's stdio client as a chat client drives it), and TLS with --ssl-certfile/--ssl-keyfile.

The Node tools are the versions the Makefile pins (NODE_TOOLS), installed into .venv/node by its `node-tools`
target, which the tests run themselves when those are not installed yet: only where npm or node is missing do
their tests skip, saying so; an install that fails fails them.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path

import anyio
import pytest
import requests
from http_server import start_http_server
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from server.main import parser

REPO = Path(__file__).resolve().parent.parent
NODE_DIR = REPO / ".venv" / "node"
REMOTE_EXAMPLE = REPO / "claude_desktop_config.remote.example.json"


@cache
def install_node_tools() -> str:
    """`make node-tools`, the set-up's own pinned install (a no-op when .venv/node has the pins); what it said."""
    done = subprocess.run(["make", "--no-print-directory", "node-tools"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    return f"{done.stdout}{done.stderr}".strip()


def node_tool(package: str, command: str) -> tuple[Path, str]:
    """The script behind `command` of the npm `package` in .venv/node, and the package's version. Skips the
    test, saying why, where npm or node is missing; fails it where the install did not bring the package."""
    missing = [tool for tool in ("npm", "node") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: install Node 20+ with npm, then `make setup` installs "
                    "the Node tools")
    major = subprocess.run(["node", "-p", "process.versions.node.split('.')[0]"], capture_output=True, text=True)
    if int(major.stdout.strip() or 0) < 20:  # the Inspector needs Node 20's globals (Debian 12's nodejs is 18)
        pytest.skip(f"node {major.stdout.strip()} is older than 20, which the pinned Inspector needs")
    said = install_node_tools()
    manifest = NODE_DIR / "node_modules" / package / "package.json"
    assert manifest.is_file(), f"`make node-tools` did not install {package} into {NODE_DIR}: {said}"
    meta = json.loads(manifest.read_text())
    return manifest.parent / meta["bin"][command], meta["version"]


@pytest.fixture
def node_home(tmp_path) -> dict[str, str]:
    """The environment of a Node tool: its own HOME (the Inspector keeps state in ~/.mcp-inspector) and
    mcp-remote's credential store (MCP_REMOTE_CONFIG_DIR, else ~/.mcp-auth) in the test's folder."""
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home), "MCP_REMOTE_CONFIG_DIR": str(home / "mcp-auth")}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made as the README shows."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: it makes the test's self-signed certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, certificate):
    """Its own server: mcp-remote's OAuth discovery sends six requests without the token on every start,
    each a bad token for the per-address lockout, which the shared `http_server` must not get near."""
    cert, key = certificate
    server = start_http_server(tmp_path_factory.mktemp("tls-workspace"), "--ssl-certfile", str(cert),
                               "--ssl-keyfile", str(key))
    yield server
    server.stop()


def test_tls_serves_https_with_the_given_certificate(tls_server, certificate):
    assert tls_server.url.startswith("https://127.0.0.1:")
    url = f"{tls_server.url}/mcp/tools"
    response = requests.get(url, headers=tls_server.headers, verify=certificate[0], timeout=30)
    assert response.status_code == 200, response.text
    assert "list-configs" in {tool["name"] for tool in response.json()["tools"]}
    # Plain http to the TLS port gets no answer from the server, only a failed connection.
    with pytest.raises(requests.ConnectionError):
        requests.get(url.replace("https://", "http://"), headers=tls_server.headers, timeout=30)


def test_under_tls_the_session_cookie_is_a_secure_host_cookie(tls_server, certificate):
    """Served with --ssl-certfile, the login sets `__Host-lora_mcp_session`: Secure, Path=/ and no Domain, which a
    browser takes only so (no sibling subdomain nor plain-http page can set it); the dashboard takes it back."""
    with requests.Session() as browser:  # verify on each call: a session's is overridden by REQUESTS_CA_BUNDLE
        answer = browser.post(f"{tls_server.url}/dashboard/login", data={"token": tls_server.token},
                              allow_redirects=False, verify=certificate[0], timeout=30)
        assert answer.status_code == 303, answer.text
        cookie = answer.headers["set-cookie"]
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
        assert cookie.startswith("__Host-lora_mcp_session=") and {"secure", "path", "httponly"} <= attributes
        assert "domain" not in attributes and "; Path=/;" in cookie
        assert browser.get(f"{tls_server.url}/dashboard/api/jobs", verify=certificate[0], timeout=30).status_code == 200


def inspector(server, home: dict[str, str], *method: str) -> dict:
    """`mcp-inspector --cli <url>/mcp --transport http` with the token header; its JSON answer."""
    cli, _ = node_tool("@modelcontextprotocol/inspector", "mcp-inspector")
    completed = subprocess.run(
        ["node", str(cli), "--cli", f"{server.url}/mcp", "--transport", "http",
         "--header", f"Authorization: Bearer {server.token}", *method],
        capture_output=True, text=True, timeout=120, env={**os.environ, **home},
    )
    assert completed.returncode == 0, f"{completed.stdout}\n{completed.stderr}"
    return json.loads(completed.stdout)


def test_the_inspector_cli_lists_and_calls_tools_over_http(http_server, node_home):
    listed = inspector(http_server, node_home, "--method", "tools/list")
    expected = requests.get(f"{http_server.url}/mcp/tools", headers=http_server.headers, timeout=30).json()
    assert {tool["name"] for tool in listed["tools"]} == {tool["name"] for tool in expected["tools"]}
    assert {"list-configs", "upload-dataset", "start-training"} <= {tool["name"] for tool in listed["tools"]}

    called = inspector(http_server, node_home, "--method", "tools/call", "--tool-name", "list-configs")
    assert called["isError"] is False
    answer = requests.post(f"{http_server.url}/mcp/tool", json={"tool": "list-configs", "arguments": {}},
                           headers=http_server.headers, timeout=30)
    assert called["structuredContent"] == answer.json()["result"]


def bridge_params(server, cert: Path, home: dict[str, str]) -> StdioServerParameters:
    """The example config's mcp-remote entry as Claude Desktop starts it, with the test's server, token
    and certificate filled in, and `node <mcp-remote>` (installed by the set-up) for `npx -y mcp-remote@V`."""
    entry = json.loads(REMOTE_EXAMPLE.read_text())["mcpServers"]["lora-trainer-http"]
    proxy, version = node_tool("mcp-remote", "mcp-remote")
    assert entry["command"] == "npx" and entry["args"][:2] == ["-y", f"mcp-remote@{version}"], (
        "the example pins another mcp-remote than the Makefile's NODE_TOOLS"
    )
    url, *options = entry["args"][2:]
    assert url == "https://gpu-box:8190/mcp"
    env = {**entry["env"], "LORA_MCP_AUTH": f"Bearer {server.token}", "NODE_EXTRA_CA_CERTS": str(cert), **home}
    return StdioServerParameters(command="node", args=[str(proxy), f"{server.url}/mcp", *options], env=env)


def test_mcp_remote_bridges_stdio_to_the_https_server(tls_server, certificate, node_home, tmp_path):
    params = bridge_params(tls_server, certificate[0], node_home)
    stderr = tmp_path / "mcp-remote.stderr"

    async def main():
        # A bridge the server refuses may wait for an OAuth sign-in nobody will do: give up instead.
        with open(stderr, "w") as errlog, anyio.fail_after(120):
            async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                names = {tool.name for tool in (await session.list_tools()).tools}
                return names, await session.call_tool("list-configs", {})

    try:
        names, called = anyio.run(main)
    except BaseException:
        print(stderr.read_text())  # what mcp-remote said, in the failure's captured output
        raise
    assert {"list-configs", "upload-dataset", "start-training"} <= names
    assert not called.is_error and called.structured_content == {"configs": []}


def test_the_example_configs_start_lora_mcp_with_real_options():
    """Each example entry that runs lora-mcp (the local one, the one over ssh) passes options lora-mcp
    parses; the mcp-remote entry names the endpoint `lora-mcp http` serves (port 8190, /mcp)."""
    local = json.loads((REPO / "claude_desktop_config.example.json").read_text())["mcpServers"]["lora-trainer"]
    remote = json.loads(REMOTE_EXAMPLE.read_text())["mcpServers"]
    over_ssh = remote["lora-trainer-ssh"]
    assert over_ssh["command"] == "ssh" and "-T" in over_ssh["args"]  # no terminal: the stream stays JSON-RPC
    # ssh joins its arguments into one command line for the remote shell.
    remote_command = shlex.split(" ".join(over_ssh["args"][over_ssh["args"].index("gpu-box") + 1:]))
    program = next(i for i, word in enumerate(remote_command) if word.endswith("/lora-mcp"))
    for args in (local["args"], remote_command[program + 1:]):
        options = parser().parse_args(args)
        assert options.command == "serve" and options.workspace is not None
    assert all("=" in word for word in remote_command[:program])  # environment assignments only
    assert parser().get_default("port") == 8190 and ":8190/mcp" in remote["lora-trainer-http"]["args"][2]
