"""The arguments of the chunked-upload tools, checked one by one: each refusal says what to send."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any

from server.errors import ServiceError
from server.names import checked_name, plain_filename_problem

DEFAULT_CHUNK_SIZE = 262144  # the guide's 256 KiB
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 4 * 1024 * 1024
MAX_METADATA_BYTES = 64 * 1024
SUFFIX = ".safetensors"
_RESERVED_KEYS = {
    "name": "the LoRA's name is the filename without .safetensors",
    "path": "the server decides where the file goes",
    "size_bytes": "the server measures the file",
    "sha256": "give it as the sha256 argument of upload-lora-chunked-start",
    "source": "the server records it",
    "upload_id": "the server records it",
    "uploaded_at": "the server records it",
    "job_id": "uploaded files come from no training job",
    "step": "uploaded files come from no training job",
    "output_format": "the server does not know an uploaded file's layout",
    "trigger_word": "give trigger_words, a list of strings",
}
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def checked_id(upload_id: Any) -> str:
    try:
        return checked_name("upload", upload_id)
    except ServiceError as exc:
        raise ServiceError(f"{exc}; a uuid4 string such as str(uuid.uuid4()) works as upload_id") from None


def checked_filename(filename: Any) -> str:
    plain = "give a plain file name such as 'my_lora.safetensors', without folders"
    if problem := plain_filename_problem(filename):
        raise ServiceError(f"filename {filename!r} {problem}: {plain}")
    if not filename.endswith(SUFFIX):
        if filename.lower().endswith(SUFFIX):
            raise ServiceError(f"filename {filename!r} must end in lower-case {SUFFIX}: rename it")
        raise ServiceError(
            f"filename {filename!r} does not end in {SUFFIX}: only safetensors LoRA files are taken "
            "(convert .ckpt/.pt/.bin files to safetensors first)"
        )
    stem = filename[: -len(SUFFIX)]
    try:
        checked_name("LoRA", stem)
    except ServiceError as exc:
        raise ServiceError(f"filename {filename!r}: {exc}") from None
    return filename


def checked_chunk_size(chunk_size: Any) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise ServiceError(f"chunk_size must be a whole number of bytes (default {DEFAULT_CHUNK_SIZE})")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ServiceError(
            f"chunk_size {chunk_size} is outside {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes: use the default, "
            f"{DEFAULT_CHUNK_SIZE} (256 KiB, about 350 KB of base64 per call)"
        )
    return chunk_size


def checked_sha256(sha256: Any) -> str | None:
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or not _HEX64.match(sha256.strip()):
        raise ServiceError(
            f"sha256 {sha256!r} is not 64 hex digits: give hashlib.sha256(file_bytes).hexdigest(), or leave it out"
        )
    return sha256.strip().lower()


def checked_metadata(metadata: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ServiceError("metadata must be an object, e.g. {'trigger_words': ['xyz_style'], 'base_model': 'SD 1.5'}")
    for key in metadata:
        if not isinstance(key, str):
            raise ServiceError(f"metadata key {key!r} is not a string: use string keys")
        if key in _RESERVED_KEYS:
            raise ServiceError(f"metadata key {key!r} is set by the server ({_RESERVED_KEYS[key]}): leave it out")
    words = metadata.get("trigger_words")
    if words is not None and (not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words)):
        raise ServiceError(f"metadata trigger_words {words!r} must be a list of non-empty strings, e.g. ['xyz_style']")
    base_model = metadata.get("base_model")
    if base_model is not None and not isinstance(base_model, str):
        raise ServiceError(f"metadata base_model {base_model!r} must be a string, e.g. 'SD 1.5'")
    try:
        text = json.dumps(metadata, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ServiceError(
            f"metadata is not plain JSON ({exc}): use strings, numbers, booleans, lists and objects"
        ) from None
    if len(text.encode("utf-8")) > MAX_METADATA_BYTES:
        raise ServiceError(
            f"metadata is {len(text.encode('utf-8'))} bytes as JSON; the limit is {MAX_METADATA_BYTES}: keep only "
            "short descriptive fields (trigger_words, base_model, ...)"
        )
    return json.loads(text)


def decoded_chunk(chunk: Any, expected: int, chunk_size: int, chunk_index: int) -> bytes:
    how = "encode exactly the chunk's bytes with standard base64, e.g. base64.b64encode(piece).decode()"
    if not isinstance(chunk, str):
        raise ServiceError(f"chunk must be a base64 string: {how}")
    text = chunk.strip()
    if not text:
        raise ServiceError(f"chunk {chunk_index} is empty: {how}")
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise ServiceError(f"chunk {chunk_index} is not valid base64 (it holds non-ASCII characters): {how}") from None
    if len(raw) > 8 * math.ceil(chunk_size / 3):  # twice the longest chunk: say so without decoding it
        raise ServiceError(
            f"chunk {chunk_index} is about {len(raw) // 4 * 3} bytes but must be exactly {expected} bytes: "
            "send exactly that slice of the file"
        )
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServiceError(f"chunk {chunk_index} is not valid base64 ({exc}): {how}") from None
