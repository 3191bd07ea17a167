"""The show-training-dashboard MCP App in headless Chromium, inside a minimal host page (issue 16, item 2).

The host page holds the App's `ui://` HTML in a sandboxed iframe (scripts only, an opaque origin, as Claude
Desktop's) under the spec's default Content-Security-Policy for a resource that declares no `ui.csp` (no network;
inline scripts and styles; `data:` images). The page queues the iframe's JSON-RPC messages in `window.outbox`; this
test is the rest of the host: it answers `ui/initialize` itself and forwards `tools/call` and `resources/read` to a
real `lora-mcp http` (the session's, with its long training `live`: tests/conftest.py) through the SDK's
Streamable HTTP client with the bearer token and the Apps extension declared, as Claude Desktop connects, and
delivers the real show-training-dashboard result as `ui/notifications/tool-result`, as the ext-apps
specification (2026-01-26) has a host do.
"""

from __future__ import annotations

import time

import anyio
import pytest
from browser import WAIT_S, console_errors, image_counts, screenshot
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.apps import APP_MIME_TYPE
from mcp.shared.exceptions import MCPError
from selenium.webdriver.common.by import By
from test_dashboard_app import APPS, TOOL
from test_http_mcp import http_client

# The restrictive default a host applies when the resource declares no `ui.csp` (the spec's "Host Behavior").
DEFAULT_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; media-src 'self' data:; connect-src 'none'"
)
HOST_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>MCP Apps test host</title><link rel="icon" href="data:,"></head>
<body>
<iframe id="view" sandbox="allow-scripts" style="width: 1240px; height: 860px; border: 0"></iframe>
<script>
window.outbox = [];
const view = document.getElementById("view");
window.addEventListener("message", (event) => {
  if (event.source === view.contentWindow) window.outbox.push(event.data);
});
window.deliver = (message) => view.contentWindow.postMessage(message, "*");
</script>
</body></html>
"""
HOST_INFO = {"name": "lora-mcp-test-host", "version": "1.0.0"}
HOST_CAPABILITIES = {"serverTools": {}, "serverResources": {}, "logging": {}}
HOST_CONTEXT = {"theme": "light", "displayMode": "inline", "platform": "web", "locale": "en-US"}


def dumped(result) -> dict:
    """An MCP result as JSON-RPC carries it (camelCase, no nulls)."""
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)


class BridgeHost:
    """The Python half of the host page: answers what the View sends, in order, and remembers the methods."""

    def __init__(self, driver, session, tool_input: dict, tool_result):
        self.driver, self.session = driver, session
        self.tool_input, self.tool_result = tool_input, tool_result
        self.methods: list[str] = []

    def deliver(self, message: dict) -> None:
        self.driver.execute_script("window.deliver(arguments[0])", {"jsonrpc": "2.0", **message})

    async def answer(self, message: dict) -> None:
        method = message.get("method")
        self.methods.append(method)
        if method == "ui/initialize":
            params = message["params"]
            assert params["protocolVersion"] and params["appInfo"]["name"], message
            result = {"protocolVersion": params["protocolVersion"], "hostInfo": HOST_INFO}
            result |= {"hostCapabilities": HOST_CAPABILITIES, "hostContext": HOST_CONTEXT}
            self.deliver({"id": message["id"], "result": result})
        elif method == "ui/notifications/initialized":  # the host may now send: the call's input, then its result
            self.deliver({"method": "ui/notifications/tool-input", "params": {"arguments": self.tool_input}})
            self.deliver({"method": "ui/notifications/tool-result", "params": dumped(self.tool_result)})
        elif method in ("tools/call", "resources/read"):
            params = message["params"]
            try:
                if method == "tools/call":
                    result = await self.session.call_tool(params["name"], params.get("arguments") or {})
                else:
                    result = await self.session.read_resource(params["uri"])
            except MCPError as error:
                self.deliver({"id": message["id"], "error": dumped(error.error)})
            else:
                self.deliver({"id": message["id"], "result": dumped(result)})
        elif "id" in message:  # a request this host does not offer (open-link, message, display mode)
            self.deliver({"id": message["id"], "error": {"code": -32601, "message": f"not offered: {method}"}})
        # Notifications (size-changed, logging) need no answer.

    async def serve_until(self, condition, what: str, timeout: float = WAIT_S):
        """Answer the View's messages until `condition(driver)` (checked inside the App's frame) is truthy."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.driver.execute_script("return window.outbox.splice(0)"):
                await self.answer(message)
            self.driver.switch_to.frame("view")
            try:
                if value := condition(self.driver):
                    return value
            finally:
                self.driver.switch_to.default_content()
            if time.monotonic() > deadline:
                console = console_errors(self.driver)
                pytest.fail(f"{what} within {timeout} s; the View sent {self.methods}; console errors: {console}")
            await anyio.sleep(0.05)  # the bridge's poll interval, as WebDriverWait's


def app_state(driver) -> dict:
    return driver.execute_script(
        "const job = document.querySelector('#job[data-rendered]');"
        "const chart = document.querySelector('svg#loss-chart');"
        "return job && {job_id: job.dataset.jobId, state: job.dataset.state, renders: Number(job.dataset.rendered),"
        "  state_text: document.querySelector('#state')?.textContent || '',"
        "  points: Number(chart?.getAttribute('data-points') || 0)};"
    )


def test_the_app_renders_a_training_job_in_a_host_page(browser, live, tmp_path):
    live.running()
    job_id = live.job_id
    host_page = tmp_path / "host.html"
    host_page.write_text(HOST_PAGE)

    async def watch(session, page):
        """The App shows the running job, follows it, and stops it."""
        shown = await session.call_tool(TOOL, {"job_id": job_id})  # what the assistant's call returned
        assert not shown.is_error, shown.content

        browser.get(host_page.as_uri())
        # The spec's default CSP, as a host's sandbox applies it: first in <head>, before any script runs.
        csp = f'<meta http-equiv="Content-Security-Policy" content="{DEFAULT_CSP}">'
        html = page.text.replace("<head>", f"<head>\n{csp}", 1)
        browser.execute_script("document.getElementById('view').srcdoc = arguments[0]", html)
        host = BridgeHost(browser, session, {"job_id": job_id}, shown)

        def drawn_job(driver):
            state = app_state(driver)
            return state if state and state["job_id"] == job_id else None

        drawn = await host.serve_until(drawn_job, "the App drew no job")
        assert host.methods[:2] == ["ui/initialize", "ui/notifications/initialized"], host.methods
        assert drawn["state"] == "running" and "running" in drawn["state_text"], drawn
        # The App refreshes itself through tools/call while the job runs: the chart gets points, then more.
        first = await host.serve_until(lambda d: app_state(d)["points"], "the App's loss chart drew no point")
        await host.serve_until(lambda d: app_state(d)["points"] > first, "the App's loss chart did not grow")
        assert "tools/call" in host.methods
        await host.serve_until(lambda d: image_counts(d, "#samples img.sample")["decoded"], "no sample image decoded")
        assert "resources/read" in host.methods  # the images came through the bridge, as data: URLs

        screenshot(browser, "app-job-running")
        browser.switch_to.frame("view")
        assert image_counts(browser, "#samples img.sample")["broken"] == 0
        browser.find_element(By.CSS_SELECTOR, "button#stop").click()
        browser.switch_to.default_content()
        await host.serve_until(lambda d: app_state(d)["state"] == "stopped", "the App did not show the job stopped")
        final = await session.call_tool("get-training-status", {"job_id": job_id})
        assert final.structured_content["state"] == "stopped"
        assert console_errors(browser) == []

    async def main():
        async with (
            http_client(live.server) as client,
            streamable_http_client(f"{live.server.url}/mcp", http_client=client) as (read, write),
            ClientSession(read, write, extensions=APPS) as session,
        ):
            await session.initialize()
            tools = {tool.name: tool for tool in (await session.list_tools()).tools}
            uri = tools[TOOL].meta["ui"]["resourceUri"]
            assert uri.startswith("ui://")
            (page,) = (await session.read_resource(uri)).contents
            assert page.mime_type == APP_MIME_TYPE
            await watch(session, page)

    anyio.run(main)
