"""The temporary files and folders of dataset zip uploads in <workspace>/datasets/, and the sweep of those a
killed server left behind.

A zip's body (up to LORA_MCP_MAX_DATASET_MB, 20 GB by default) is received into `.upload-*.zip`, and a new
dataset is written into a `.staging-*` folder that takes the dataset's name once the zip is read, so a
fault half-way leaves no half dataset. Both are hidden (list-datasets skips dot names). A server killed
during an upload (SIGKILL, out of memory) cannot remove them: their names carry the pid and start time of
the process that made them, and before each upload those whose process is gone are removed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from training.processes import CREATE_TIME_SLACK_S, create_time

UPLOAD_PREFIX = ".upload-"
STAGING_PREFIX = ".staging-"
# A name without a pid and start time (made before they were recorded) is left for an hour: longer than
# any upload takes to be received and read (20 GB at 50 MB/s is 7 minutes).
UNOWNED_AGE_S = 3600


def upload_file(datasets: Path) -> tuple[int, Path]:
    """A new temporary file for a zip's body in `datasets` (its open descriptor and path), after the sweep."""
    datasets.mkdir(parents=True, exist_ok=True)
    sweep(datasets)
    fd, name = tempfile.mkstemp(prefix=UPLOAD_PREFIX + _owner(), suffix=".zip", dir=datasets)
    return fd, Path(name)


def staging_folder(datasets: Path) -> Path:
    """A new, empty folder in `datasets` for a new dataset's files until they are all written (made as the
    dataset's own folder would be: tempfile.mkdtemp's would keep its owner-only mode as the dataset's)."""
    folder = datasets / f"{STAGING_PREFIX}{_owner()}{secrets.token_hex(8)}"
    folder.mkdir(parents=True)
    return folder


def sweep(datasets: Path) -> None:
    """Remove the temporary uploads and staging folders in `datasets` whose process is gone."""
    for path in [*datasets.glob(UPLOAD_PREFIX + "*"), *datasets.glob(STAGING_PREFIX + "*")]:
        if _abandoned(path):
            with contextlib.suppress(OSError):  # gone already (another server's sweep), or not ours to remove
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()


def _owner() -> str:
    """'<pid>-<start time>-' of this process: with both, a reused pid does not pass for the dead owner."""
    return f"{os.getpid()}-{int(create_time(os.getpid()) or 0)}-"


def _abandoned(path: Path) -> bool:
    prefix = UPLOAD_PREFIX if path.name.startswith(UPLOAD_PREFIX) else STAGING_PREFIX
    pid, _, rest = path.name[len(prefix) :].partition("-")
    started, _, _ = rest.partition("-")
    if not (pid.isdigit() and started.isdigit()):
        try:
            return time.time() - path.lstat().st_mtime > UNOWNED_AGE_S
        except OSError:
            return False
    running_since = create_time(int(pid))
    return running_since is None or abs(running_since - int(started)) >= CREATE_TIME_SLACK_S
