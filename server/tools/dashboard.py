"""show-training-dashboard: a job's dashboard inside the chat, as an MCP App (the SDK's `mcp.server.apps`).

The tool is bound to the `ui://` page of server/dashboard_app.py: a host with MCP Apps (Claude Desktop) renders
that page and hands it the tool's result, whose structured content is the JobView the web dashboard's job page
draws. A client without Apps reads the text, JobView.summary: the extension must degrade gracefully (SEP-2133).
"""

from __future__ import annotations

from typing import Annotated

from mcp.server.apps import Apps, client_supports_apps
from mcp.server.mcpserver import Context
from mcp.types import CallToolResult, TextContent
from pydantic import Field

from server.dashboard_app import dashboard_html
from server.dashboard_views import DashboardViews, JobView
from server.errors import WorkspaceStateError
from server.tools import READ_ONLY, Services, tool
from server.tools.datasets import in_request

DASHBOARD_URI = "ui://lora-trainer/dashboard.html"


def dashboard_apps(s: Services) -> Apps:
    """The MCP Apps extension with the dashboard tool and its page, for `MCPServer(extensions=[...])`. The page
    is assembled here, once: a missing asset stops the server at start-up with DashboardAssetError."""
    apps = Apps()
    tools = DashboardTools(s)
    show = tools.show_training_dashboard
    apps.tool(resource_uri=DASHBOARD_URI, **show.mcp_tool)(show)
    apps.add_html_resource(
        DASHBOARD_URI,
        dashboard_html(),
        name="training-dashboard",
        title="LoRA training dashboard",
        description="The page show-training-dashboard's results are drawn in (MCP Apps hosts).",
        # No csp: the page loads nothing from the network (its images arrive through resources/read).
        prefers_border=True,
    )
    return apps


class DashboardTools:
    def __init__(self, s: Services):
        self.call = s.call
        self.views = DashboardViews(s)

    @tool(
        "show-training-dashboard",
        "Show a job to the user as a live dashboard in the chat (clients with MCP Apps, e.g. Claude Desktop): "
        "state and progress, loss (raw and smoothed), validation loss, learning rate and gradient norm charts, the "
        "sample grid, the log tail, the diagnosis findings with their fixes, the config, and stop/resume buttons; it "
        "refreshes itself while the job runs, so do not call it again to follow a job. Other clients get a text "
        "summary. Without job_id: the running job, else the newest.",
        READ_ONLY,
    )
    def show_training_dashboard(
        self,
        ctx: Context,
        job_id: str | None = Field(None, description="Job id from list-training-jobs; default: the latest job."),
    ) -> Annotated[CallToolResult, JobView]:
        view: JobView = self.call(lambda: self.views.job(job_id or self._latest_job_id()))
        if in_request(ctx) and client_supports_apps(ctx):
            # The host draws the structured content; the assistant reads the summary's first line (state, step).
            text = f"{view.summary.splitlines()[0]}. The dashboard in the chat shows it, live while it runs."
        else:
            text = view.summary
        return CallToolResult(
            content=[TextContent(type="text", text=text)], structured_content=view.model_dump(mode="json")
        )

    def _latest_job_id(self) -> str:
        job_id = self.views.latest_job_id()
        if job_id is None:
            raise WorkspaceStateError(
                "There are no jobs yet: create-training-config, then start-training; show-training-dashboard "
                "then shows the job."
            )
        return job_id
