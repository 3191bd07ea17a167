"""Which folders outside the workspace the server may read and write: those listed in
LORA_MCP_ALLOWED_DIRS (os.pathsep-separated) and the roots the MCP client offers (file:// roots,
read when a tool that takes a folder runs). Model paths are exempt: they are only read."""

from __future__ import annotations

import os
from pathlib import Path

from server.errors import ServiceError

ALLOWED_DIRS_ENV = "LORA_MCP_ALLOWED_DIRS"
# The stdio server has one client: the roots it offered last (resolved folders).
_client_roots: list[Path] = []


def set_client_roots(uris: list[str]) -> None:
    """Remember the client's file:// roots (other schemes are not folders here)."""
    from urllib.parse import unquote, urlparse

    folders = []
    for uri in uris:
        parsed = urlparse(uri)
        if parsed.scheme == "file" and parsed.path:
            folders.append(Path(unquote(parsed.path)).resolve())
    _client_roots[:] = folders


def allowed_roots(workspace: Path) -> list[Path]:
    extra = [Path(p).expanduser().resolve() for p in os.environ.get(ALLOWED_DIRS_ENV, "").split(os.pathsep) if p]
    return [Path(workspace).resolve(), *extra, *_client_roots]


def looks_like_path(value: str) -> bool:
    """A bare name (a dataset or run name) is not a path; anything with a separator or a leading
    '~' or '.' is."""
    return "/" in value or os.sep in value or value.startswith(("~", "."))


def check_user_path(field: str, value: str, workspace: Path) -> None:
    """Refuse a path that, with links resolved, lies outside the workspace and the allowed folders.
    Relative paths are taken from the workspace, as the trainer (started there) takes them."""
    if not looks_like_path(value):
        return
    given = Path(value).expanduser()
    resolved = (given if given.is_absolute() else Path(workspace) / given).resolve()
    roots = allowed_roots(workspace)
    if not any(resolved.is_relative_to(root) for root in roots):
        raise ServiceError(
            f"{field} {value!r} is outside the folders this server may use ({', '.join(map(str, roots))}): "
            f"move the files into the workspace, add their folder to {ALLOWED_DIRS_ENV} in the server's "
            "environment (Claude Desktop: the env block of claude_desktop_config.json), or offer it as a root "
            "from the client"
        )
