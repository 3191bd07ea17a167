"""Names that become file or folder names in the workspace (configs, datasets, jobs)."""

from __future__ import annotations

import re

from server.errors import ServiceError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def checked_name(kind: str, name: str) -> str:
    """`name` if it is safe as a single path component, else a ServiceError saying why."""
    if not isinstance(name, str) or ".." in name or not _NAME.match(name):
        raise ServiceError(
            f"{kind} name {name!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (no '/', '..' or absolute paths)"
        )
    return name
