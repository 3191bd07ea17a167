"""The durable state of chunked uploads, on disk, so an upload survives a server restart half-way:

    <workspace>/uploads/<upload_id>/upload.json   filename, sizes, sha256, metadata, created_at
    <workspace>/uploads/<upload_id>/data.part     the file, total_size bytes long from the start
    <workspace>/uploads/<upload_id>/chunks/<i>    an empty marker per chunk that arrived
    <workspace>/uploads/.finished/<upload_id>.json  a tombstone: where a finished upload went
    <workspace>/.upload-locks/<upload_id>.lock    the upload's lock (filelock: flock, or Windows' locking)

An upload folder appears whole (it is built under a hidden name and renamed into place) and
disappears whole (renamed away, then deleted). Chunk i is written at offset i * chunk_size and
fsynced before its marker is created, so a marker always means the bytes are on disk. The lock
lives outside the upload's folder: Windows renames no folder with an open file inside, and taking
a lock would make its folder again. A holder reads the upload's state once it has the lock, so an
upload removed while it waited reads as gone. What the upload tools say about this state is `server.uploads`'s.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock
from pydantic import BaseModel

from server.upload_arguments import SUFFIX
from training.workspace import DIR_MODE, atomic_write_json

UPLOAD_JSON = "upload.json"
DATA_FILE = "data.part"
CHUNKS_DIR = "chunks"
LOCKS_DIR = ".upload-locks"  # beside the uploads folder
FINISHED_DIR = ".finished"


class UploadRecord(BaseModel):
    """upload.json."""

    upload_id: str
    filename: str
    total_size: int
    chunk_size: int
    sha256: str | None
    metadata: dict[str, Any]
    created_at: float

    @property
    def chunks(self) -> int:
        return math.ceil(self.total_size / self.chunk_size)

    @property
    def stem(self) -> str:
        return self.filename[: -len(SUFFIX)]

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.total_size - index * self.chunk_size)

    def parameters(self) -> dict[str, Any]:
        return self.model_dump(include={"filename", "total_size", "chunk_size", "sha256", "metadata"})

    def missing(self, received: set[int]) -> list[int]:
        return [i for i in range(self.chunks) if i not in received]


class UploadStore:
    def __init__(self, folder: Path):
        self.folder = folder
        self.locks = folder.with_name(LOCKS_DIR)

    def data_file(self, upload_id: str) -> Path:
        return self.folder / upload_id / DATA_FILE

    def create(self, upload: UploadRecord) -> bool:
        """Build the upload's folder under a hidden name and rename it into place; False when another
        start with this id won the race (its folder stands). OSError when the disk refuses."""
        if (self.folder / upload.upload_id).exists():  # a folder left half-removed by a crash
            self.discard(upload.upload_id)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.locks.mkdir(exist_ok=True)
        self._lock_file(upload.upload_id).touch()  # made with the upload, so taking the lock writes nothing
        staging = Path(tempfile.mkdtemp(prefix=".start-", dir=self.folder))
        try:
            os.chmod(staging, DIR_MODE)
            (staging / CHUNKS_DIR).mkdir()
            with (staging / DATA_FILE).open("wb") as f:
                f.truncate(upload.total_size)
                os.fsync(f.fileno())
            atomic_write_json(staging / UPLOAD_JSON, upload.model_dump(mode="json"))
            fsync_dir(staging)
            try:
                os.rename(staging, self.folder / upload.upload_id)
            except OSError:
                if self.read(upload.upload_id) is None:
                    raise
                return False
            fsync_dir(self.folder)
            return True
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def write_chunk(self, upload: UploadRecord, index: int, data: bytes) -> bool:
        """Store chunk `index` (its bytes, then its marker); False when it had arrived before with other
        bytes (the first ones are kept). OSError when the disk refuses."""
        folder = self.folder / upload.upload_id
        marker = folder / CHUNKS_DIR / str(index)
        offset = index * upload.chunk_size
        if marker.exists():
            with (folder / DATA_FILE).open("rb") as f:
                f.seek(offset)
                return f.read(len(data)) == data
        with (folder / DATA_FILE).open("r+b") as f:  # the file has its full size: chunks overwrite in place
            f.seek(offset)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        marker.touch()
        fsync_dir(marker.parent)
        return True

    @contextlib.contextmanager
    def locked(self, upload_id: str) -> Iterator[UploadRecord | None]:
        """Hold the upload's lock (between processes and threads); yields its state, read once the lock
        is held, or None when there is no such upload."""
        if not (self.folder / upload_id).is_dir():
            yield None  # no lock file is made for an upload that does not exist
            return
        with FileLock(self._lock_file(upload_id)):
            yield self.read(upload_id)

    def _lock_file(self, upload_id: str) -> Path:
        return self.locks / f"{upload_id}.lock"

    def read(self, upload_id: str) -> UploadRecord | None:
        try:
            state = json.loads((self.folder / upload_id / UPLOAD_JSON).read_text(encoding="utf-8"))
            return UploadRecord.model_validate(state)
        except (OSError, ValueError):
            return None

    def received(self, upload: UploadRecord) -> set[int]:
        try:
            names = os.listdir(self.folder / upload.upload_id / CHUNKS_DIR)
        except OSError:
            return set()
        return {int(n) for n in names if n.isdigit() and int(n) < upload.chunks}

    # --- finished uploads ------------------------------------------------------------------------
    def finished(self, upload_id: str) -> dict | None:
        """The tombstone of a finished upload (its name and path), or None."""
        try:
            return json.loads(self._tombstone(upload_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def mark_finished(self, upload_id: str, name: str, path: Path) -> None:
        tombstone = {"upload_id": upload_id, "name": name, "path": str(path), "finished_at": time.time()}
        with contextlib.suppress(OSError):  # the LoRA is in place; the tombstone only improves messages
            atomic_write_json(self._tombstone(upload_id), tombstone)

    def _tombstone(self, upload_id: str) -> Path:
        return self.folder / FINISHED_DIR / f"{upload_id}.json"

    # --- removal ---------------------------------------------------------------------------------
    def discard(self, upload_id: str) -> None:
        """Remove the upload's folder: renamed away first, so it vanishes at once, then deleted."""
        folder = self.folder / upload_id
        trash = self.folder / f".trash-{upload_id}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(folder, trash)
        except OSError:
            trash = folder
        shutil.rmtree(trash, ignore_errors=True)

    def expire(self, expiry_seconds: float) -> list[str]:
        """Delete unfinished uploads (and tombstones of finished ones, and the locks of uploads gone) older
        than `expiry_seconds`, and what a crash left behind; returns the ids of the unfinished uploads
        deleted."""
        if not self.folder.is_dir():
            return []
        now = time.time()
        removed = []
        for entry in sorted(self.folder.iterdir()):
            name = entry.name
            if name.startswith(".trash-"):
                shutil.rmtree(entry, ignore_errors=True)
            elif name.startswith(".start-"):
                if now - _mtime(entry) > expiry_seconds:
                    shutil.rmtree(entry, ignore_errors=True)
            elif not name.startswith(".") and entry.is_dir():
                with self.locked(name) as upload:
                    created = upload.created_at if upload is not None else _mtime(entry)
                    if now - created > expiry_seconds:
                        self.discard(name)
                        removed.append(name)
        finished = self.folder / FINISHED_DIR
        if finished.is_dir():
            for tombstone in finished.glob("*.json"):
                if now - _mtime(tombstone) > expiry_seconds:
                    tombstone.unlink(missing_ok=True)
        # A lock outlives its upload (a holder may still wait on it) until it is as old as an expired one.
        for lock in self.locks.glob("*.lock"):
            if now - _mtime(lock) > expiry_seconds and not (self.folder / lock.stem).is_dir():
                with contextlib.suppress(OSError):  # Windows deletes no file another process holds open
                    lock.unlink(missing_ok=True)
        return removed


def fsync_dir(path: Path) -> None:
    """Make a directory's new entries durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
