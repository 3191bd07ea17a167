"""Which folders outside the workspace the server may read and write: only those listed in
LORA_MCP_ALLOWED_DIRS (os.pathsep-separated). Model paths are exempt: they are only read."""

from __future__ import annotations

import os
from pathlib import Path

from server.errors import ServiceError

ALLOWED_DIRS_ENV = "LORA_MCP_ALLOWED_DIRS"


def allowed_roots(workspace: Path) -> list[Path]:
    extra = [Path(p).expanduser().resolve() for p in os.environ.get(ALLOWED_DIRS_ENV, "").split(os.pathsep) if p]
    return [Path(workspace).resolve(), *extra]


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
            f"move the files into the workspace, or add their folder to {ALLOWED_DIRS_ENV} in the server's "
            "environment (Claude Desktop: the env block of claude_desktop_config.json)"
        )
