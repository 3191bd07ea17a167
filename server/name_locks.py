"""Per-name locks: one call at a time changes a named thing (a config, a dataset, a LoRA file).

Service calls run side by side in worker threads (and a second server may share the workspace), so
a read-modify-write of one named thing ("does config X exist? then write it", "read the captions,
then write them back") holds that thing's lock for its whole span. Calls on different names never
wait for each other, and readers take no lock: every file is written atomically (a temporary file
renamed into place), so a reader sees the old or the new file, never half of one.

The lock is a `filelock.FileLock` (flock, or Windows' locking), so it excludes other threads and other
server processes alike. Its files live in the user's cache folder (not the shared, world-writable
temporary folder, where another user could create or remove them), one folder per workspace (by the
hash of its resolved path), not in the workspace: a refused call leaves the workspace exactly
as it was, and the files must stay (deleting one while a call waits on it would let a third call take
a different lock for the same name). Servers on other machines are not excluded; SQLite's WAL, which
holds the job table, does not work across machines either.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import platformdirs
from filelock import FileLock, Timeout

from server.errors import WorkspaceStateError
from training.workspace import APP_NAME

# The longest call that holds a name lock writes one upload-dataset batch (200 images) or merges two
# full-size LoRAs in a child (about a minute for FLUX); a call waiting longer than this says so.
WAIT_S = 300.0
NameKind = Literal["config", "dataset", "lora"]


@contextmanager
def name_lock(workspace: Path, kind: NameKind, name: str, *, wait_s: float = WAIT_S) -> Iterator[None]:
    """Hold the lock of the `kind` named `name` (already checked by `server.names.checked_name`)."""
    folder = lock_folder(workspace)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / f"{kind}-{name}.lock")  # a fresh lock (own file handle) per holder
    try:
        lock.acquire(timeout=wait_s)
    except Timeout:
        raise WorkspaceStateError(
            f"{kind} {name!r} is being changed by another call that has run for over {wait_s:.0f} s; "
            "try again once it has finished"
        ) from None
    try:
        yield
    finally:
        lock.release()


def lock_folder(workspace: Path) -> Path:
    """Where the workspace's name locks are: the same folder for every server of this user on it."""
    key = hashlib.sha256(str(Path(workspace).resolve()).encode("utf-8")).hexdigest()[:16]
    return platformdirs.user_cache_path(APP_NAME) / "locks" / key
