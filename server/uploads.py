"""LoRA files uploaded in chunks: upload-lora-chunked-start, -append and -finish.

An upload's state is on disk (`server.upload_store`: its folder, chunk markers and lock), so it
survives a server restart half-way. Chunks arrive in any order and a chunk sent again with the same
bytes is accepted. `finish` checks that every chunk arrived, the size, the sha256 (when given) and
that the bytes are a well-formed safetensors file, then links the file into
`loras/<stem>.safetensors` (never over an existing file) and writes its `.json` sidecar in the
layout `server.loras.LoraService` reads. Nothing reaches loras/ before all of that passed.

This module is a plain service: the MCP tools wrap it, tests call it directly. It imports no
torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from server.errors import ServiceError, WorkspaceStateError
from server.name_locks import name_lock
from server.safetensors_file import InvalidSafetensors, safetensors_metadata
from server.upload_arguments import (
    DEFAULT_CHUNK_SIZE,
    SUFFIX,
    checked_chunk_size,
    checked_filename,
    checked_id,
    checked_metadata,
    checked_sha256,
    decoded_chunk,
)
from server.upload_store import UploadRecord, UploadStore, fsync_dir
from training.published_loras import NameTaken, publish
from training.workspace import atomic_write_json

MAX_CHUNKS = 65536  # one marker file per chunk: at the default chunk size this is 16 GiB
MAX_MISSING_LISTED = 20

START_TOOL = "upload-lora-chunked-start"
APPEND_TOOL = "upload-lora-chunked-append"
FINISH_TOOL = "upload-lora-chunked-finish"

class UploadStarted(BaseModel):
    upload_id: str = Field(description="The upload's id; give it to every append and to finish.")
    filename: str = Field(description="The file's name; the LoRA lands in loras/ under this name.")
    total_size: int = Field(description="The file's size in bytes.")
    chunk_size: int = Field(
        description="Bytes per chunk: chunk i is bytes [i * chunk_size, (i + 1) * chunk_size) of the file; "
        "only the last chunk is shorter."
    )
    chunks: int = Field(description="How many chunks to send, indexes 0 to chunks - 1.")
    expires_at: float = Field(description="Unix time after which an unfinished upload is deleted.")
    next_step: str = Field(description="What to do next.")


class ChunkReceived(BaseModel):
    upload_id: str
    chunk_index: int = Field(description="The chunk this call stored (or found already stored, with the same bytes).")
    received_chunks: int = Field(description="Chunks stored so far.")
    total_chunks: int = Field(description="Chunks the upload needs.")
    missing: list[int] = Field(description="Up to 20 chunk indexes not yet received, lowest first.")
    complete: bool = Field(description=f"True when every chunk arrived: call {FINISH_TOOL} next.")


class UploadFinished(BaseModel):
    upload_id: str
    name: str = Field(description="The LoRA's name in loras/ (the filename without .safetensors).")
    path: str = Field(description="Where the LoRA file is on the server.")
    size_bytes: int
    sha256: str = Field(description="SHA-256 of the file, hex.")
    trigger_words: list[str] = Field(
        description="Trigger words from the metadata, else the file's own modelspec.trigger_phrase, else empty."
    )
    base_model: str | None = Field(description="Base model from the metadata, else the file's ss_sd_model_name.")
    next_step: str = Field(description="What to do next.")


class UploadService:
    def __init__(self, workspace: Path, *, max_total_size: int = 4 * 2**30, expiry_seconds: float = 24 * 3600):
        self.workspace = Path(workspace)
        self.folder = self.workspace / "uploads"
        self.loras = self.workspace / "loras"
        self.max_total_size = max_total_size
        self.expiry_seconds = expiry_seconds
        self.store = UploadStore(self.folder)

    # --- start -----------------------------------------------------------------------------------
    def start(
        self,
        upload_id: str,
        filename: str,
        total_size: int,
        metadata: dict | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        sha256: str | None = None,
    ) -> UploadStarted:
        """Begin an upload (or, with the same arguments again, report the one already begun)."""
        upload_id = checked_id(upload_id)
        self._refuse_if_finished(upload_id)
        wanted = UploadRecord(
            upload_id=upload_id,
            filename=checked_filename(filename),
            total_size=self._checked_total_size(total_size),
            chunk_size=checked_chunk_size(chunk_size),
            sha256=checked_sha256(sha256),
            metadata=checked_metadata(metadata),
            created_at=time.time(),
        )
        if wanted.chunks > MAX_CHUNKS:
            smallest = math.ceil(wanted.total_size / MAX_CHUNKS / 1024) * 1024
            raise ServiceError(
                f"{wanted.chunks} chunks of {wanted.chunk_size} bytes is too many (at most {MAX_CHUNKS}): "
                f"use a chunk_size of at least {smallest} bytes (the default, {DEFAULT_CHUNK_SIZE}, works)"
            )

        self.expire()  # an expired upload under this id is gone before it is judged
        existing = self.store.read(upload_id)
        if existing is not None:
            return self._restarted(existing, wanted)
        self._refuse_if_target_exists(wanted.stem, f"choose another filename or delete loras/{wanted.filename} first")
        self._check_free_space(wanted.total_size)
        try:
            created = self.store.create(wanted)
        except OSError as exc:
            raise WorkspaceStateError(
                f"the upload could not be created on the server ({exc.strerror or exc}): check the server's disk, "
                f"then call {START_TOOL} again"
            ) from None
        if not created:  # another start with this id won the race: its folder stands, judge against it
            return self._restarted(self.store.read(upload_id), wanted)
        return self._started(wanted, received=set(), again=False)

    def _restarted(self, existing: UploadRecord, wanted: UploadRecord) -> UploadStarted:
        if existing.parameters() != wanted.parameters():
            given, stored = wanted.parameters(), existing.parameters()
            differences = ", ".join(
                f"{key} {given[key]!r} (the upload has {stored[key]!r})" for key in given if given[key] != stored[key]
            )
            raise WorkspaceStateError(
                f"upload_id {existing.upload_id!r} is already in use with other arguments: {differences}. "
                f"Continue that upload with {APPEND_TOOL}, or start this file under a new upload_id "
                "(e.g. a fresh uuid4)"
            )
        with self.store.locked(existing.upload_id) as upload:
            if upload is None:  # finished or expired meanwhile
                self._refuse_if_finished(existing.upload_id)
                raise WorkspaceStateError(f"upload {existing.upload_id!r} expired just now: call {START_TOOL} again")
            return self._started(upload, received=self.store.received(upload), again=True)

    def _started(self, upload: UploadRecord, received: set[int], again: bool) -> UploadStarted:
        last = upload.chunk_length(upload.chunks - 1)
        expires_at = upload.created_at + self.expiry_seconds
        if again:
            missing = upload.missing(received)
            step = (
                f"This upload was already started; {len(received)} of {upload.chunks} chunks arrived"
                + (f", missing: {_listed(missing)}. Send those with {APPEND_TOOL}, " if missing else ". ")
                + f"then call {FINISH_TOOL}."
            )
        else:
            step = (
                f"Send the {upload.chunks} chunk(s) with {APPEND_TOOL} (upload_id, chunk = the bytes as base64, "
                f"chunk_index): chunk i is bytes [i * {upload.chunk_size}, (i + 1) * {upload.chunk_size}) of the "
                f"file, the last one ({upload.chunks - 1}) is {last} bytes. Any order works, and a chunk may be sent "
                f"again. Then call {FINISH_TOOL}."
            )
        step += f" Unfinished uploads are deleted at {_utc(expires_at)}."
        return UploadStarted(
            upload_id=upload.upload_id,
            filename=upload.filename,
            total_size=upload.total_size,
            chunk_size=upload.chunk_size,
            chunks=upload.chunks,
            expires_at=expires_at,
            next_step=step,
        )

    # --- append ----------------------------------------------------------------------------------
    def append(self, upload_id: str, chunk: str, chunk_index: int) -> ChunkReceived:
        """Store one chunk (base64) at its place in the file."""
        upload_id = checked_id(upload_id)
        with self.store.locked(upload_id) as upload:
            upload = self._live(upload_id, upload)
            if isinstance(chunk_index, bool) or not isinstance(chunk_index, int):
                raise ServiceError(f"chunk_index must be a whole number from 0 to {upload.chunks - 1}")
            if not 0 <= chunk_index < upload.chunks:
                raise ServiceError(
                    f"chunk_index {chunk_index} is out of range: this upload has {upload.chunks} chunk(s), "
                    f"indexes 0 to {upload.chunks - 1} (chunk i starts at byte i * {upload.chunk_size})"
                )
            expected = upload.chunk_length(chunk_index)
            data = decoded_chunk(chunk, expected, upload.chunk_size, chunk_index)
            if len(data) != expected:
                what = "the last chunk" if chunk_index == upload.chunks - 1 else "every chunk but the last"
                raise ServiceError(
                    f"chunk {chunk_index} is {len(data)} bytes but {what} must be exactly {expected} bytes "
                    f"(bytes {chunk_index * upload.chunk_size} to {chunk_index * upload.chunk_size + expected - 1} "
                    f"of the file; chunk_size is {upload.chunk_size}): send exactly that slice, base64-encoded"
                )
            try:
                kept = self.store.write_chunk(upload, chunk_index, data)
            except OSError as exc:
                raise WorkspaceStateError(
                    f"chunk {chunk_index} could not be stored ({exc.strerror or exc}): check the server's disk, "
                    "then send the chunk again"
                ) from None
            if not kept:
                raise WorkspaceStateError(
                    f"chunk {chunk_index} already arrived with different bytes, and the first ones are kept: "
                    "check that you slice the file the same way each time. If the file itself changed, "
                    f"upload it anew under a new upload_id with {START_TOOL}"
                )
            received = self.store.received(upload)
            return ChunkReceived(
                upload_id=upload_id,
                chunk_index=chunk_index,
                received_chunks=len(received),
                total_chunks=upload.chunks,
                missing=upload.missing(received)[:MAX_MISSING_LISTED],
                complete=len(received) == upload.chunks,
            )

    # --- finish ----------------------------------------------------------------------------------
    def finish(self, upload_id: str) -> UploadFinished:
        """Check the whole file and move it into loras/ with its sidecar."""
        upload_id = checked_id(upload_id)
        with self.store.locked(upload_id) as upload:
            upload = self._live(upload_id, upload)
            missing = upload.missing(self.store.received(upload))
            if missing:
                raise WorkspaceStateError(
                    f"{len(missing)} of {upload.chunks} chunk(s) have not arrived yet: {_listed(missing)}. "
                    f"Send them with {APPEND_TOOL}, then call {FINISH_TOOL} again"
                )
            data_file = self.store.data_file(upload_id)
            size, digest, file_metadata = self._verified(upload, data_file)
            target = self.loras / upload.filename
            given_words = upload.metadata.get("trigger_words") or []
            phrase = file_metadata.get("modelspec.trigger_phrase")
            trigger_words = list(given_words) or ([phrase] if isinstance(phrase, str) and phrase.strip() else [])
            base_model = upload.metadata.get("base_model") or file_metadata.get("ss_sd_model_name")
            sidecar = {
                **upload.metadata,
                "name": upload.stem,
                "path": str(target),
                "size_bytes": size,
                "sha256": digest,
                "source": "upload",
                "upload_id": upload_id,
                "uploaded_at": time.time(),
                "trigger_words": trigger_words,
                "trigger_word": trigger_words[0] if trigger_words else None,
                "base_model": base_model,
                "job_id": None,
                "step": None,
                "output_format": None,
            }
            with name_lock(self.workspace, "lora", upload.stem):  # merge/convert/export name loras/ files too
                self._refuse_if_target_exists(
                    upload.stem,
                    f"delete it and call {FINISH_TOOL} again, or upload the file under another filename",
                    unless_same_as=data_file,
                )
                created = self._land(data_file, target)
                try:
                    atomic_write_json(target.with_suffix(".json"), sidecar)
                except OSError as exc:
                    if created:
                        target.unlink(missing_ok=True)
                    raise WorkspaceStateError(
                        f"the LoRA's sidecar could not be written ({exc.strerror or exc}): check the server's "
                        f"disk, then call {FINISH_TOOL} again"
                    ) from None
            self.store.mark_finished(upload_id, upload.stem, target)
            self.store.discard(upload_id)
            return UploadFinished(
                upload_id=upload_id,
                name=upload.stem,
                path=str(target),
                size_bytes=size,
                sha256=digest,
                trigger_words=trigger_words,
                base_model=base_model,
                next_step=f"The LoRA {upload.stem!r} is in loras/ (list-exported-models shows it)"
                + (f"; prompt with {trigger_words[0]!r} to use it." if trigger_words else "."),
            )

    def _verified(self, upload: UploadRecord, data_file: Path) -> tuple[int, str, dict[str, str]]:
        """The assembled file's size, sha256 and safetensors metadata, once it is the file announced at
        start; otherwise the upload is discarded and the ServiceError says to start again."""
        retry = (
            f"The upload was discarded: start again with {START_TOOL} (the same upload_id may be used) "
            "and send every chunk"
        )
        try:
            size = data_file.stat().st_size
            digest = _sha256(data_file)
        except OSError as exc:
            raise WorkspaceStateError(
                f"the uploaded file could not be read ({exc.strerror or exc}): check the server's disk, "
                f"then call {FINISH_TOOL} again"
            ) from None
        if size != upload.total_size:
            self.store.discard(upload.upload_id)
            raise ServiceError(f"the assembled file is {size} bytes, not the {upload.total_size} announced. {retry}")
        if upload.sha256 is not None and digest != upload.sha256:
            self.store.discard(upload.upload_id)
            raise ServiceError(
                f"the assembled file's sha256 is {digest}, not the {upload.sha256} given at start: some chunk "
                f"was not the file's bytes at its place (or the sha256 given was wrong). {retry}"
            )
        try:
            return size, digest, safetensors_metadata(data_file)
        except InvalidSafetensors as exc:
            self.store.discard(upload.upload_id)
            raise ServiceError(
                f"the uploaded file is not a valid safetensors file ({exc}): send the .safetensors file's own "
                f"bytes, unchanged. {retry}"
            ) from None

    def _land(self, source: Path, target: Path) -> bool:
        """Publish `source` as `target` the way every writer into loras/ does (training/published_loras.py:
        linked into place, never over a file there; the filename is exact); False when it already is there."""
        with contextlib.suppress(FileNotFoundError):
            if os.path.samefile(source, target):
                return False  # a finish that stopped after landing the file: carry on from there
        try:
            publish(self.loras, target.stem, None, lambda tmp: _link_or_copy(source, tmp), exact=True)
            fsync_dir(self.loras)
        except NameTaken:
            raise WorkspaceStateError(
                f"loras/{target.name} appeared while finishing: delete it and call {FINISH_TOOL} again, "
                "or upload the file under another filename"
            ) from None
        except OSError as exc:
            raise WorkspaceStateError(
                f"the LoRA could not be written to loras/ ({exc.strerror or exc}): check the server's disk, "
                f"then call {FINISH_TOOL} again"
            ) from None
        return True

    # --- expire ----------------------------------------------------------------------------------
    def expire(self) -> list[str]:
        """Delete unfinished uploads (and tombstones of finished ones) older than expiry_seconds.

        Returns the ids of the unfinished uploads deleted.
        """
        return self.store.expire(self.expiry_seconds)

    # --- state -----------------------------------------------------------------------------------
    def _live(self, upload_id: str, upload: UploadRecord | None) -> UploadRecord:
        """The upload, or a ServiceError saying why there is none to continue."""
        if upload is None:
            self._refuse_if_finished(upload_id)
            raise WorkspaceStateError(
                f"there is no upload {upload_id!r}: start it with {START_TOOL} first (unfinished uploads are "
                f"deleted {self.expiry_seconds / 3600:g} h after they start)"
            )
        if time.time() > upload.created_at + self.expiry_seconds:
            self.store.discard(upload_id)
            raise WorkspaceStateError(
                f"upload {upload_id!r} expired at {_utc(upload.created_at + self.expiry_seconds)} and was deleted: "
                f"start again with {START_TOOL} and send every chunk"
            )
        return upload

    def _refuse_if_finished(self, upload_id: str) -> None:
        record = self.store.finished(upload_id)
        if record is None:
            return
        raise WorkspaceStateError(
            f"upload {upload_id!r} is already finished: the LoRA is at {record.get('path')} "
            f"(name {record.get('name')!r}). To upload another file, use a new upload_id with {START_TOOL}"
        )

    def _refuse_if_target_exists(self, stem: str, advice: str, unless_same_as: Path | None = None) -> None:
        target = self.loras / f"{stem}{SUFFIX}"
        if not (target.exists() or target.is_symlink()):
            return
        if unless_same_as is not None:
            with contextlib.suppress(OSError):
                if os.path.samefile(target, unless_same_as):
                    return
        raise WorkspaceStateError(f"loras/{target.name} already exists: {advice}")

    def _check_free_space(self, size: int) -> None:
        probe = self.workspace
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            free = shutil.disk_usage(probe).free
        except OSError:
            return
        if free < size:
            raise WorkspaceStateError(
                f"the server has {free / 2**20:.1f} MiB of free disk but the file is {size / 2**20:.1f} MiB: "
                "free some space on the server (e.g. delete old runs or LoRAs), then start again"
            )

    def _checked_total_size(self, total_size: Any) -> int:
        if isinstance(total_size, bool) or not isinstance(total_size, int):
            raise ServiceError("total_size must be the file's size in bytes, a whole number")
        if not 1 <= total_size <= self.max_total_size:
            raise ServiceError(
                f"total_size {total_size} is outside 1 to {self.max_total_size} bytes "
                f"({self.max_total_size / 2**30:g} GiB): give the .safetensors file's exact size in bytes"
                + (" (an empty file is not a LoRA)" if total_size <= 0 else "")
            )
        return total_size


# --- small helpers -------------------------------------------------------------------------------
def _link_or_copy(source: Path, target: Path) -> None:
    """`target` as a hard link to the upload's data (no second copy of a large file), else a copy."""
    try:
        os.link(source, target)
    except OSError:  # no hard links on this filesystem
        shutil.copyfile(source, target)


def _listed(indexes: list[int]) -> str:
    shown = ", ".join(str(i) for i in indexes[:MAX_MISSING_LISTED])
    more = len(indexes) - MAX_MISSING_LISTED
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
