"""Which folders outside the workspace the server may read and write: those listed in
LORA_MCP_ALLOWED_DIRS (os.pathsep-separated: ':' here, ';' on Windows) and the roots the MCP client
offers (file:// roots, read when a tool that takes a folder runs). Model paths are exempt: they are
only read.

Paths are read by the rules of the platform the server runs on; the functions that depend on them
take that platform's path module (`flavour`: `posixpath` or `ntpath`, default `os.path`), so the
Windows rules (drive letters, backslashes, UNC shares, case-insensitive names) are tested anywhere.
"""

from __future__ import annotations

import ntpath
import os
import posixpath
from collections.abc import Iterable
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from types import ModuleType
from urllib.parse import unquote, urlparse

from server.errors import ServiceError

ALLOWED_DIRS_ENV = "LORA_MCP_ALLOWED_DIRS"
# The stdio server has one client: the roots it offered last (resolved folders).
_client_roots: list[Path] = []
_PURE_PATHS: dict[ModuleType, type[PurePath]] = {posixpath: PurePosixPath, ntpath: PureWindowsPath}


def set_client_roots(uris: list[str]) -> None:
    """Remember the client's file:// roots (other schemes are not folders here)."""
    _client_roots[:] = [Path(folder).resolve() for uri in uris if (folder := path_from_file_uri(uri))]


def path_from_file_uri(uri: str, flavour: ModuleType = os.path) -> str | None:
    """The local path of a file:// URI (file:///C:/Users/me on Windows, file://server/share for a UNC
    share), or None for another scheme."""
    parsed = urlparse(uri)
    if parsed.scheme != "file" or not parsed.path:
        return None
    path = unquote(parsed.path)
    if flavour is not ntpath:
        return path
    if parsed.netloc not in ("", "localhost"):  # file://server/share/sets is \\server\share\sets
        path = f"//{parsed.netloc}{path}"
    elif ntpath.splitdrive(path[1:])[0]:  # file:///C:/Users is C:\Users
        path = path[1:]
    return path.replace("/", "\\")


def allowed_roots(workspace: Path) -> list[Path]:
    extra = [Path(p).expanduser().resolve() for p in allowed_dirs(os.environ.get(ALLOWED_DIRS_ENV, ""))]
    return [Path(workspace).resolve(), *extra, *_client_roots]


def allowed_dirs(value: str, flavour: ModuleType = os.path) -> list[str]:
    """The folders of an LORA_MCP_ALLOWED_DIRS value, split at the platform's path separator (';' on
    Windows, where ':' follows every drive letter)."""
    return [folder for folder in value.split(flavour.pathsep) if folder]


def looks_like_path(value: str, flavour: ModuleType = os.path) -> bool:
    """A bare name (a dataset or run name) is not a path; anything with a separator, a drive
    ('C:', '\\\\server\\share') or a leading '~' or '.' is."""
    separators = {"/", flavour.sep, flavour.altsep} - {None}
    has_drive = bool(flavour.splitdrive(value)[0])
    return any(sep in value for sep in separators) or has_drive or value.startswith(("~", "."))


def is_within(path: str | PurePath, roots: Iterable[str | PurePath], flavour: ModuleType = os.path) -> bool:
    """Whether `path` is one of `roots` or inside one, compared as the platform compares paths (on
    Windows without regard to case, and a drive or share never inside another); `path` and `roots` are
    resolved already."""
    pure = _PURE_PATHS[flavour]
    return any(pure(path).is_relative_to(pure(root)) for root in roots)


def check_user_path(field: str, value: str, workspace: Path) -> None:
    """Refuse a path that, with links resolved, lies outside the workspace and the allowed folders.
    Relative paths are taken from the workspace, as the trainer (started there) takes them."""
    if not looks_like_path(value):
        return
    given = Path(value).expanduser()
    resolved = (given if given.is_absolute() else Path(workspace) / given).resolve()
    roots = allowed_roots(workspace)
    if not is_within(resolved, roots):
        raise ServiceError(
            f"{field} {value!r} is outside the folders this server may use ({', '.join(map(str, roots))}): "
            f"move the files into the workspace, add their folder to {ALLOWED_DIRS_ENV} in the server's "
            "environment (Claude Desktop: the env block of claude_desktop_config.json), or offer it as a root "
            "from the client"
        )
