"""The `ui://` document of the show-training-dashboard MCP App: one self-contained HTML page.

A host renders an App's HTML in a sandboxed iframe whose default Content-Security-Policy allows inline scripts
and styles and `data:` images but no network (the ext-apps spec, 2026-01-26), so the page carries the web
dashboard's own stylesheet and scripts inlined, and its sample images come through `resources/read` as
`data:` URLs. It is assembled once, when the server starts, from the package's server/dashboard_assets/.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "dashboard_assets"
STYLES = ("dashboard.css",)
# In this order: job_view.js draws with charts.js, and app.js (the bridge to the host) calls job_view.js.
SCRIPTS = ("charts.js", "job_view.js", "app.js")

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>LoRA training</title>
{styles}
</head>
<body data-page="app">
<p id="app-status" role="status" hidden></p>
<main id="job"></main>
{scripts}
</body>
</html>
"""


class DashboardAssetError(RuntimeError):
    """The package's dashboard files are missing or unusable: the server cannot offer the App."""


def dashboard_html(assets: Path = ASSETS) -> str:
    """The App's HTML with every stylesheet and script of `assets` inlined."""
    styles = "\n".join(f"<style>\n{_asset(assets, name, '</style')}\n</style>" for name in STYLES)
    scripts = "\n".join(f"<script>\n{_asset(assets, name, '</script')}\n</script>" for name in SCRIPTS)
    return PAGE.format(styles=styles, scripts=scripts)


def _asset(assets: Path, name: str, closing_tag: str) -> str:
    path = assets / name
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DashboardAssetError(
            f"the dashboard file {path} cannot be read ({exc.strerror or exc}): the lora-mcp package is incomplete; "
            "reinstall it (pip install --force-reinstall lora-mcp, or pip install -e . in a checkout)"
        ) from None
    # Inlined, the text would end its <script>/<style> element early at this tag and show the rest as page text.
    if closing_tag in text.lower():
        raise DashboardAssetError(f"{path} contains {closing_tag!r}, which cannot be inlined in the App's HTML")
    return text
