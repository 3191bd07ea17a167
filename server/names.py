"""Names that become file or folder names in the workspace (configs, datasets, jobs, uploads), and
the file names a tool is given: every service checks them here, so every front end refuses the same.
A name must be one on every platform: Windows' device names (CON, NUL, COM1, ...) are refused here
too, so a workspace moves between machines and a name never opens a device.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from server.errors import ServiceError
from training.config import NAME_PATTERN

NAME_LENGTH = 100  # the longest name NAME_PATTERN takes
# Names Windows keeps for devices in every folder, whatever the case and extension ("nul.txt" is NUL).
WINDOWS_DEVICE_NAMES = frozenset(
    {"CON", "PRN", "AUX", "NUL", *(f"{port}{n}" for port in ("COM", "LPT") for n in [*"0123456789", "¹", "²", "³"])}
)
DEVICE_NAMES_SAID = "a device name on Windows (CON, PRN, AUX, NUL, COM1-9, LPT1-9, with any extension)"


def is_safe_name(name: Any) -> bool:
    """Whether `name` is safe as a single path component: letters, digits, '.', '_', '-', no '..', not a
    device name."""
    return isinstance(name, str) and ".." not in name and bool(NAME_PATTERN.match(name)) and not is_device_name(name)


def is_device_name(name: str) -> bool:
    """Whether Windows reads `name` as a device (CON, NUL, COM1, ...), with any extension or case."""
    return name.split(".")[0].rstrip(" ").upper() in WINDOWS_DEVICE_NAMES


def checked_name(kind: str, name: str) -> str:
    """`name` if it is safe as a single path component, else a ServiceError saying why."""
    if isinstance(name, str) and is_device_name(name):
        raise ServiceError(f"{kind} name {name!r} is {DEVICE_NAMES_SAID}: choose another")
    if not is_safe_name(name):
        raise ServiceError(
            f"{kind} name {name!r} is not allowed: use 1-{NAME_LENGTH} letters, digits, '.', '_' or '-', starting "
            "with a letter or digit (no '/', '..' or absolute paths)"
        )
    return name


def plain_filename_problem(filename: Any) -> str | None:
    """Why `filename` is not a plain file name inside one folder, said after "the filename", or None."""
    if not isinstance(filename, str) or not filename.strip():
        return "is empty"
    if "/" in filename or "\\" in filename:
        return "contains a folder separator"
    if ":" in filename:
        return "contains ':' (on Windows a drive, as in 'C:name', or a hidden stream of the file)"
    if is_device_name(filename):
        return f"is {DEVICE_NAMES_SAID}"
    if ".." in filename:
        return "contains '..'"
    if filename.startswith("."):
        return "starts with '.' (a hidden file, which training and listings skip)"
    return None


def free_name(wanted: str, taken: Callable[[str], bool], *, suffix: str = "") -> str:
    """`wanted` + `suffix`, numbered -2, -3, ... while `taken` says a name is in use; `wanted` is cut so the
    result keeps its suffix and number within the NAME_LENGTH characters a name may have."""
    for number in itertools.count(1):
        ending = suffix + (f"-{number}" if number > 1 else "")
        name = wanted[: NAME_LENGTH - len(ending)] + ending
        if not taken(name):
            return name
    raise AssertionError("itertools.count never ends")
