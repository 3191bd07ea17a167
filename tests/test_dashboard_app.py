"""Issue 16 item 2: show-training-dashboard, the job's dashboard as an MCP App, through the SDK's real stdio
client: the tool names its ui:// page, the page is one self-contained HTML document with the Apps MIME type,
a client without Apps reads a summary and a client that declares the extension gets the JobView to draw.
The page itself, driven in Chromium by a host page, is tests/test_app_browser.py's."""

from __future__ import annotations

import base64
import io
import shutil
from html.parser import HTMLParser
from pathlib import Path

import anyio
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import stdio_client
from mcp.server.apps import APP_MIME_TYPE, EXTENSION_ID
from PIL import Image
from test_mcp_server import server_params

from server.app import build_server
from server.dashboard_app import ASSETS, SCRIPTS, STYLES, DashboardAssetError, dashboard_html
from server.dashboard_views import JobView
from server.tools.dashboard import DASHBOARD_URI

TOOL = "show-training-dashboard"
APPS = {EXTENSION_ID: {"mimeTypes": [APP_MIME_TYPE]}}  # what an Apps host (Claude Desktop) declares


def run_client(workspace: Path, script, extensions: dict | None = None):
    """`lora-mcp --workspace` as a subprocess and the SDK's client, declaring `extensions`; `script(session)`'s
    result."""

    async def main():
        with open(workspace.parent / f"{workspace.name}-server.err", "a") as errlog:
            async with (
                stdio_client(server_params(workspace), errlog=errlog) as (read, write),
                ClientSession(read, write, extensions=extensions) as session,
            ):
                await session.initialize()
                return await script(session)

    return anyio.run(main)


@pytest.fixture(scope="module")
def trained(finished_training) -> tuple[Path, str]:
    """(workspace, job_id): the session's workspace with one finished training of 4 steps, sampled (a test prompt
    and the control) at steps 0, 2 and 4 (tests/conftest.py). The tools the tests call only read it."""
    return finished_training.workspace, finished_training.job_id


class Page(HTMLParser):
    """The page's tags that would load something (src=, href=) and the text of its <script> and <style> elements."""

    def __init__(self, html: str):
        super().__init__()
        self.loads: list[tuple[str, str]] = []
        self.inlined: dict[str, list[str]] = {"script": [], "style": []}
        self._open: str | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.loads += [(tag, f"{name}={value}") for name, value in attrs if name in ("src", "href")]
        self._open = tag if tag in self.inlined else None

    def handle_data(self, data):
        if self._open:
            self.inlined[self._open].append(data.strip())

    def handle_endtag(self, tag):
        self._open = None


def test_the_tool_names_its_ui_page_and_the_page_is_one_self_contained_document(trained):
    workspace, _job_id = trained

    async def script(session):
        return await session.list_tools(), await session.read_resource(DASHBOARD_URI)

    tools, page = run_client(workspace, script, APPS)
    tool = next(tool for tool in tools.tools if tool.name == TOOL)
    assert tool.meta["ui"] == {"resourceUri": DASHBOARD_URI}
    assert tool.output_schema["title"] == "JobView" and tool.annotations.read_only_hint
    assert set(tool.input_schema["properties"]) == {"job_id"} and not tool.input_schema.get("required")

    (content,) = page.contents
    assert content.mime_type == APP_MIME_TYPE == "text/html;profile=mcp-app"
    assert content.meta["ui"] == {"prefersBorder": True}  # no csp: the page reaches no network
    parsed = Page(content.text)
    assert content.text.startswith("<!DOCTYPE html>") and parsed.loads == []
    # Each asset inlined whole, in order: the scripts run as classic scripts, app.js last.
    assert parsed.inlined["style"] == [(ASSETS / name).read_text(encoding="utf-8").strip() for name in STYLES]
    assert parsed.inlined["script"] == [(ASSETS / name).read_text(encoding="utf-8").strip() for name in SCRIPTS]
    assert 'id="job"' in content.text and SCRIPTS[-1] == "app.js"


def test_a_client_without_apps_reads_the_summary_and_gets_the_job_view(trained):
    workspace, job_id = trained

    async def script(session):
        return await session.call_tool(TOOL, {}), await session.call_tool(TOOL, {"job_id": job_id})

    latest, named = run_client(workspace, script)
    for result in (latest, named):
        assert not result.is_error, result.content
        view = JobView.model_validate(result.structured_content)
        assert view.row.job_id == job_id and view.row.state == "completed" and view.row.step == 4
        (text,) = result.content
        assert text.text == view.summary
        assert "completed" in text.text and "4" in text.text  # the state and the step, for the assistant
    assert latest.structured_content == named.structured_content


def test_a_client_with_apps_gets_the_view_to_draw_and_the_samples_it_names(trained):
    workspace, job_id = trained

    async def script(session):
        result = await session.call_tool(TOOL, {"job_id": job_id})
        cells = result.structured_content["samples"]
        # What app.js does for each cell: read the sample through the host, as a data: URL.
        images = [await session.read_resource(f"lora://jobs/{job_id}/samples/{cell['filename']}") for cell in cells]
        return result, images

    result, images = run_client(workspace, script, APPS)
    assert not result.is_error, result.content
    view = JobView.model_validate(result.structured_content)
    assert view.row.job_id == job_id and view.metrics.steps == [1, 2, 3, 4]
    cells = [(cell.step, cell.control) for cell in view.samples]
    assert cells == [(step, control) for step in (0, 2, 4) for control in (False, True)]
    (text,) = result.content
    # The page shows the job; the assistant reads one line naming it.
    assert "\n" not in text.text and job_id in text.text and "completed" in text.text and "4/4" in text.text
    for image in images:
        (content,) = image.contents
        with Image.open(io.BytesIO(base64.b64decode(content.blob))) as decoded:
            assert decoded.size == (64, 64) and content.mime_type == "image/png"


def test_without_a_job_or_with_an_unknown_one_the_tool_says_what_to_do(tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()

    async def script(session):
        return await session.call_tool(TOOL, {}), await session.call_tool(TOOL, {"job_id": "nope"})

    none, unknown = run_client(workspace, script, APPS)
    assert none.is_error and "no jobs yet" in none.content[0].text and "start-training" in none.content[0].text
    assert unknown.is_error and "no job 'nope'" in unknown.content[0].text
    assert "list-training-jobs" in unknown.content[0].text


def test_the_http_json_api_without_an_mcp_session_gets_the_summary(trained):
    """POST /mcp/tool runs the tool through MCPServer.call_tool, with no request (so no client capabilities)."""
    workspace, job_id = trained
    server = build_server(workspace)
    result = anyio.run(lambda: server.call_tool(TOOL, {"job_id": job_id}))
    assert result.content[0].text == result.structured_content["summary"]


def test_a_missing_or_uninlinable_asset_is_a_clear_start_up_error(tmp_path):
    assets = tmp_path / "assets"
    shutil.copytree(ASSETS, assets)
    (assets / "job_view.js").unlink()
    with pytest.raises(DashboardAssetError, match="job_view.js cannot be read .* reinstall"):
        dashboard_html(assets)
    shutil.copy(ASSETS / "job_view.js", assets)
    (assets / "app.js").write_text('console.log("</SCRIPT>");\n', encoding="utf-8")
    with pytest.raises(DashboardAssetError, match="app.js contains '</script'"):
        dashboard_html(assets)
