"""Size limits the operator can set in the server's environment (megabytes)."""

from __future__ import annotations

import os

MB = 2**20


def count(variable: str, default: int | None) -> int | None:
    """A positive whole number from `variable` if it is set, else `default`; a bad value stops start-up."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) <= 0:
        raise ValueError(f"{variable}={raw!r}: give a positive whole number")
    return int(raw)


def megabytes(variable: str, default_mb: float) -> int:
    """Bytes from `variable` (in MB) if it is set, else `default_mb`; a bad value stops start-up with a clear error."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return int(default_mb * MB)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"{variable}={raw!r}: give a positive number of megabytes, e.g. {variable}={default_mb:g}")
    return int(value * MB)
