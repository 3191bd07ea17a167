"""UploadService: LoRA files uploaded in chunks, reassembled on disk and checked before they reach loras/."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import time
import uuid
from pathlib import Path

import pytest

from server.errors import ServiceError
from server.loras import LoraService
from server.safetensors_file import InvalidSafetensors, safetensors_metadata
from server.uploads import (
    DEFAULT_CHUNK_SIZE,
    ChunkReceived,
    UploadFinished,
    UploadService,
    UploadStarted,
)

CHUNK = 65536


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root`: a file's bytes, None for a folder."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def pieces(data: bytes, size: int = CHUNK) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.fixture
def workspace(tmp_path) -> Path:
    return tmp_path / "ws"


@pytest.fixture
def service(workspace) -> UploadService:
    return UploadService(workspace)


def start(service: UploadService, data: bytes, upload_id: str = "u1", **overrides) -> UploadStarted:
    values = dict(
        filename="my_lora.safetensors",
        total_size=len(data),
        metadata={"trigger_words": ["xyz_style", "xyz"], "base_model": "FLUX", "notes": {"epochs": 3}},
        chunk_size=CHUNK,
    )
    values.update(overrides)
    return service.start(upload_id, **values)


def send_all(service: UploadService, data: bytes, upload_id: str = "u1") -> None:
    for index, piece in enumerate(pieces(data)):
        service.append(upload_id, b64(piece), index)


@pytest.fixture
def started(service, lora_bytes) -> str:
    start(service, lora_bytes)
    return "u1"


# --- good uploads --------------------------------------------------------------------------------


def test_out_of_order_upload_with_a_repeat_lands_byte_exact_with_sidecar(service, workspace, lora_bytes):
    upload_id = str(uuid.uuid4())
    digest = hashlib.sha256(lora_bytes).hexdigest()
    started = start(service, lora_bytes, upload_id, sha256=digest.upper())
    assert started.chunks == 5 and started.chunk_size == CHUNK and started.total_size == len(lora_bytes)
    assert started.expires_at == pytest.approx(time.time() + 24 * 3600, abs=60)
    assert "upload-lora-chunked-append" in started.next_step

    parts = pieces(lora_bytes)
    for index in [3, 0, 4, 3, 1]:  # 3 twice, 2 not yet
        result = service.append(upload_id, b64(parts[index]), index)
        assert isinstance(result, ChunkReceived) and result.chunk_index == index
    assert (result.received_chunks, result.total_chunks, result.missing, result.complete) == (4, 5, [2], False)
    result = service.append(upload_id, b64(parts[2]), 2)
    assert (result.received_chunks, result.missing, result.complete) == (5, [], True)

    finished = service.finish(upload_id)
    assert isinstance(finished, UploadFinished)
    target = workspace / "loras" / "my_lora.safetensors"
    assert finished.name == "my_lora" and finished.path == str(target)
    assert finished.size_bytes == len(lora_bytes) and finished.sha256 == digest
    assert finished.trigger_words == ["xyz_style", "xyz"] and finished.base_model == "FLUX"
    assert target.read_bytes() == lora_bytes
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest

    sidecar = json.loads(target.with_suffix(".json").read_text())
    assert sidecar["trigger_words"] == ["xyz_style", "xyz"] and sidecar["trigger_word"] == "xyz_style"
    assert sidecar["base_model"] == "FLUX" and sidecar["notes"] == {"epochs": 3}
    assert sidecar["source"] == "upload" and sidecar["sha256"] == digest and sidecar["size_bytes"] == len(lora_bytes)
    assert sidecar["job_id"] is None and sidecar["step"] is None and sidecar["output_format"] is None

    listed = LoraService(workspace).list()
    assert [(lora.name, lora.trigger_word, lora.base_model) for lora in listed] == [("my_lora", "xyz_style", "FLUX")]
    assert not (workspace / "uploads" / upload_id).exists()
    assert sorted(p.name for p in (workspace / "loras").iterdir()) == ["my_lora.json", "my_lora.safetensors"]


def test_without_metadata_the_files_own_trigger_phrase_and_model_are_used(service, workspace, lora_bytes):
    start(service, lora_bytes, metadata=None)
    send_all(service, lora_bytes)
    finished = service.finish("u1")
    assert finished.trigger_words == ["file_phrase"] and finished.base_model == "sd15"
    assert LoraService(workspace).list()[0].trigger_word == "file_phrase"


def test_default_chunk_size_takes_a_small_file_in_one_chunk(service, lora_bytes):
    started = service.start("one", "single.safetensors", len(lora_bytes))
    assert started.chunk_size == DEFAULT_CHUNK_SIZE and started.chunks == 2
    service.append("one", b64(lora_bytes[:DEFAULT_CHUNK_SIZE]), 0)
    assert service.append("one", b64(lora_bytes[DEFAULT_CHUNK_SIZE:]), 1).complete
    assert service.finish("one").size_bytes == len(lora_bytes)


def test_a_restarted_server_continues_the_upload(workspace, lora_bytes):
    parts = pieces(lora_bytes)
    first = UploadService(workspace)
    start(first, lora_bytes)
    first.append("u1", b64(parts[0]), 0)
    first.append("u1", b64(parts[4]), 4)
    del first

    second = UploadService(workspace)
    again = start(second, lora_bytes)  # the client retrying start after the restart is fine
    assert "2 of 5 chunks arrived" in again.next_step and "[1, 2, 3]" in again.next_step
    for index in (1, 2, 3):
        result = second.append("u1", b64(parts[index]), index)
    assert result.complete
    assert Path(second.finish("u1").path).read_bytes() == lora_bytes


def test_start_again_with_the_same_arguments_reports_the_same_upload(service, workspace, lora_bytes):
    first = start(service, lora_bytes)
    service.append("u1", b64(pieces(lora_bytes)[0]), 0)
    before = snapshot(workspace)
    second = start(service, lora_bytes)
    assert second.model_dump(exclude={"next_step"}) == first.model_dump(exclude={"next_step"})
    assert snapshot(workspace) == before


def test_start_again_with_other_arguments_is_refused(service, workspace, lora_bytes, started):
    before = snapshot(workspace)
    with pytest.raises(ServiceError, match=r"already in use with other arguments: total_size"):
        start(service, lora_bytes, total_size=len(lora_bytes) + 1)
    with pytest.raises(ServiceError, match=r"filename 'other.safetensors'"):
        start(service, lora_bytes, filename="other.safetensors")
    assert snapshot(workspace) == before


# --- finish --------------------------------------------------------------------------------------


def test_finish_before_every_chunk_lists_the_missing_and_keeps_the_upload(service, workspace, lora_bytes, started):
    parts = pieces(lora_bytes)
    service.append(started, b64(parts[1]), 1)
    service.append(started, b64(parts[3]), 3)
    with pytest.raises(ServiceError, match=r"3 of 5 chunk\(s\) have not arrived yet: \[0, 2, 4\]"):
        service.finish(started)
    assert not (workspace / "loras").exists()
    for index in (0, 2, 4):
        service.append(started, b64(parts[index]), index)
    assert Path(service.finish(started).path).read_bytes() == lora_bytes


def test_missing_list_is_capped_at_twenty(workspace):
    service = UploadService(workspace)
    service.start("many", "many.safetensors", 1024 * 30, chunk_size=1024)
    with pytest.raises(ServiceError, match=r"30 of 30 chunk\(s\).*\[0, 1, .*, 19, \.\.\. and 10 more\]"):
        service.finish("many")
    result = service.append("many", b64(bytes(1024)), 5)
    assert result.missing == [i for i in range(21) if i != 5] and result.received_chunks == 1


def test_second_finish_says_where_the_lora_went(service, workspace, lora_bytes, started):
    send_all(service, lora_bytes)
    path = service.finish(started).path
    with pytest.raises(ServiceError, match=r"already finished: the LoRA is at " + path):
        service.finish(started)
    with pytest.raises(ServiceError, match="already finished"):
        service.append(started, b64(pieces(lora_bytes)[0]), 0)
    with pytest.raises(ServiceError, match="already finished"):
        start(service, lora_bytes)
    assert Path(path).read_bytes() == lora_bytes


def test_wrong_sha256_is_refused_and_the_upload_can_be_sent_again(service, workspace, lora_bytes):
    start(service, lora_bytes, sha256="0" * 64)
    send_all(service, lora_bytes)
    with pytest.raises(ServiceError, match=r"sha256 is [0-9a-f]{64}, not the 0{64}.*start again"):
        service.finish("u1")
    assert not (workspace / "loras").exists()
    assert not (workspace / "uploads" / "u1").exists()  # discarded: its chunks cannot be corrected
    with pytest.raises(ServiceError, match="no upload 'u1'"):
        service.append("u1", b64(pieces(lora_bytes)[0]), 0)

    start(service, lora_bytes, sha256=hashlib.sha256(lora_bytes).hexdigest())  # the same id again
    send_all(service, lora_bytes)
    assert Path(service.finish("u1").path).read_bytes() == lora_bytes


def test_bytes_that_are_not_safetensors_never_reach_loras(service, workspace):
    data = os.urandom(3 * CHUNK + 100)
    service.start("junk", "junk.safetensors", len(data), chunk_size=CHUNK)
    send_all(service, data, "junk")
    with pytest.raises(ServiceError, match="not a valid safetensors file"):
        service.finish("junk")
    assert not (workspace / "loras").exists()
    assert not (workspace / "uploads" / "junk").exists()


def test_a_corrupted_tensor_range_is_refused(service, workspace, lora_bytes):
    header_size = struct.unpack("<Q", lora_bytes[:8])[0]
    cut = lora_bytes[: 8 + header_size + 1000]  # a valid header, most of the data missing
    service.start("cut", "cut.safetensors", len(cut), chunk_size=CHUNK)
    send_all(service, cut, "cut")
    with pytest.raises(ServiceError, match="not a valid safetensors file .*cut short or corrupt"):
        service.finish("cut")
    assert not (workspace / "loras").exists()


def test_an_existing_lora_is_refused_at_start(service, workspace, lora_bytes):
    (workspace / "loras").mkdir(parents=True)
    (workspace / "loras" / "my_lora.safetensors").write_bytes(b"theirs")
    before = snapshot(workspace)
    with pytest.raises(ServiceError, match="my_lora.safetensors already exists: choose another filename"):
        start(service, lora_bytes)
    assert snapshot(workspace) == before


def test_a_lora_that_appears_meanwhile_is_refused_at_finish_and_kept(service, workspace, lora_bytes, started):
    send_all(service, lora_bytes)
    (workspace / "loras").mkdir(parents=True)
    theirs = workspace / "loras" / "my_lora.safetensors"
    theirs.write_bytes(b"theirs")
    with pytest.raises(ServiceError, match="already exists: delete it and call upload-lora-chunked-finish again"):
        service.finish(started)
    assert theirs.read_bytes() == b"theirs" and not theirs.with_suffix(".json").exists()
    theirs.unlink()
    assert Path(service.finish(started).path).read_bytes() == lora_bytes


# --- bad chunks ----------------------------------------------------------------------------------


def test_append_to_an_unknown_upload_says_to_start_one(service, workspace):
    with pytest.raises(ServiceError, match="no upload 'nope': start it with upload-lora-chunked-start"):
        service.append("nope", b64(b"x" * CHUNK), 0)
    assert not workspace.exists()


@pytest.mark.parametrize("index", [-1, 5, 99])
def test_chunk_index_out_of_range(service, workspace, lora_bytes, started, index):
    before = snapshot(workspace)
    with pytest.raises(ServiceError, match=r"out of range: this upload has 5 chunk\(s\), indexes 0 to 4"):
        service.append(started, b64(pieces(lora_bytes)[0]), index)
    assert snapshot(workspace) == before


@pytest.mark.parametrize(
    ("index", "length", "expected"),
    [(0, CHUNK - 1, CHUNK), (2, CHUNK + 1, CHUNK), (4, CHUNK, None), (4, 10, None)],
    ids=["short", "long", "last-too-long", "last-too-short"],
)
def test_wrong_chunk_length(service, workspace, lora_bytes, started, index, length, expected):
    expected = expected or len(lora_bytes) - 4 * CHUNK
    before = snapshot(workspace)
    with pytest.raises(ServiceError, match=rf"chunk {index} is {length} bytes but .* exactly {expected} bytes"):
        service.append(started, b64(os.urandom(length)), index)
    assert snapshot(workspace) == before


@pytest.mark.parametrize(
    "chunk",
    ["not base64!!", "QUJD\nREVG", "QUJDRA", "QUJD=REVG", "ÄÖÜ", ""],
    ids=["symbols", "inner-newline", "no-padding", "inner-padding", "non-ascii", "empty"],
)
def test_invalid_base64_is_refused(service, workspace, started, chunk):
    before = snapshot(workspace)
    with pytest.raises(ServiceError, match="not valid base64|is empty"):
        service.append(started, chunk, 0)
    assert snapshot(workspace) == before


def test_a_resent_chunk_with_other_bytes_is_refused(service, workspace, lora_bytes, started):
    parts = pieces(lora_bytes)
    service.append(started, b64(parts[1]), 1)
    before = snapshot(workspace)
    changed = bytes([parts[1][0] ^ 1]) + parts[1][1:]
    with pytest.raises(ServiceError, match="chunk 1 already arrived with different bytes"):
        service.append(started, b64(changed), 1)
    assert snapshot(workspace) == before
    assert service.append(started, b64(parts[1]), 1).received_chunks == 1  # the same bytes again are fine


# --- bad starts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("upload_id", ["../x", "a/b", "/abs", "", "..", ".hidden", "a b", "x" * 101])
def test_bad_upload_ids_are_refused_and_nothing_is_created(service, workspace, lora_bytes, upload_id):
    with pytest.raises(ServiceError, match="upload name .* is not allowed.*uuid4"):
        start(service, lora_bytes, upload_id)
    with pytest.raises(ServiceError, match="is not allowed"):
        service.append(upload_id, b64(b"x"), 0)
    with pytest.raises(ServiceError, match="is not allowed"):
        service.finish(upload_id)
    assert not workspace.exists()


@pytest.mark.parametrize(
    ("filename", "reason"),
    [
        ("../x", "folder separator"),
        ("a/b.safetensors", "folder separator"),
        ("a\\b.safetensors", "folder separator"),
        ("/abs.safetensors", "folder separator"),
        ("..safetensors", r"'\.\.'"),
        ("x.bin", r"does not end in \.safetensors"),
        ("x.SAFETENSORS", "lower-case"),
        ("x.safetensors.bin", r"does not end in \.safetensors"),
        (".hidden.safetensors", "hidden"),
        (".safetensors", "hidden"),
        ("", "empty"),
        ("my lora.safetensors", "LoRA name 'my lora' is not allowed"),
        ("-x.safetensors", "LoRA name '-x' is not allowed"),
    ],
)
def test_bad_filenames_are_refused_and_nothing_is_created(service, workspace, lora_bytes, filename, reason):
    with pytest.raises(ServiceError, match=reason):
        start(service, lora_bytes, filename=filename)
    assert not workspace.exists()


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"total_size": 0}, r"total_size 0 is outside 1 to \d+ bytes"),
        ({"total_size": -5}, "total_size -5 is outside"),
        ({"total_size": 10_000_001}, "total_size 10000001 is outside 1 to 10000000 bytes"),
        ({"total_size": 1.5}, "whole number"),
        ({"chunk_size": 1023}, "chunk_size 1023 is outside 1024 to 4194304"),
        ({"chunk_size": 4 * 2**20 + 1}, "chunk_size 4194305 is outside"),
        ({"sha256": "abc"}, "not 64 hex digits"),
        ({"sha256": "g" * 64}, "not 64 hex digits"),
        ({"metadata": ["xyz"]}, "metadata must be an object"),
        ({"metadata": {"trigger_words": "xyz"}}, "must be a list of non-empty strings"),
        ({"metadata": {"trigger_words": ["ok", ""]}}, "must be a list of non-empty strings"),
        ({"metadata": {"base_model": 15}}, "base_model 15 must be a string"),
        ({"metadata": {"name": "other"}}, "metadata key 'name' is set by the server"),
        ({"metadata": {"step": 5}}, "metadata key 'step' is set by the server"),
        ({"metadata": {1: "x"}}, "is not a string"),
        ({"metadata": {"when": object()}}, "not plain JSON"),
        ({"metadata": {"x": float("nan")}}, "not plain JSON"),
        ({"metadata": {"notes": "n" * 70_000}}, "the limit is 65536"),
    ],
)
def test_bad_sizes_and_metadata_are_refused_and_nothing_is_created(workspace, lora_bytes, overrides, reason):
    service = UploadService(workspace, max_total_size=10_000_000)
    with pytest.raises(ServiceError, match=reason):
        start(service, lora_bytes, **overrides)
    assert not workspace.exists()


def test_too_many_chunks_are_refused(workspace):
    with pytest.raises(ServiceError, match=r"1048576 chunks of 1024 bytes is too many .* at least 16384 bytes"):
        UploadService(workspace).start("big", "big.safetensors", 2**30, chunk_size=1024)
    assert not workspace.exists()


# --- expiry --------------------------------------------------------------------------------------


def test_expire_removes_old_uploads_only(service, workspace, lora_bytes):
    start(service, lora_bytes, "old")
    start(service, lora_bytes, "new")
    service.append("old", b64(pieces(lora_bytes)[0]), 0)
    state_file = workspace / "uploads" / "old" / "upload.json"
    state = json.loads(state_file.read_text())
    state["created_at"] -= 25 * 3600
    state_file.write_text(json.dumps(state))

    assert service.expire() == ["old"]
    assert sorted(p.name for p in (workspace / "uploads").iterdir()) == ["new"]
    assert service.expire() == []
    with pytest.raises(ServiceError, match="no upload 'old'"):
        service.append("old", b64(pieces(lora_bytes)[0]), 0)
    assert not (workspace / "loras").exists()


def test_an_expired_upload_is_refused_when_used(workspace, lora_bytes):
    # Long enough for start and the chunks on a loaded 2-core machine (50 ms was not), short enough to wait out.
    service = UploadService(workspace, expiry_seconds=1.0)
    start(service, lora_bytes)
    send_all(service, lora_bytes)
    time.sleep(1.1)
    with pytest.raises(ServiceError, match="expired at .* start again with upload-lora-chunked-start"):
        service.finish("u1")
    assert not (workspace / "loras").exists() and not (workspace / "uploads" / "u1").exists()


def test_expire_forgets_finished_uploads_after_a_while(workspace, lora_bytes):
    service = UploadService(workspace, expiry_seconds=3600)
    start(service, lora_bytes)
    send_all(service, lora_bytes)
    service.finish("u1")
    (tombstone,) = (workspace / "uploads" / ".finished").iterdir()
    old = time.time() - 7200
    os.utime(tombstone, (old, old))
    assert service.expire() == []
    assert not tombstone.exists()
    assert (workspace / "loras" / "my_lora.safetensors").read_bytes() == lora_bytes  # the LoRA stays


# --- the safetensors check -----------------------------------------------------------------------


def write(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_safetensors_check_reads_the_metadata_of_a_real_file(tmp_path, lora_bytes):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(lora_bytes)
    assert safetensors_metadata(path) == {"modelspec.trigger_phrase": "file_phrase", "ss_sd_model_name": "sd15"}


@pytest.mark.parametrize(
    ("header", "data", "reason"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "cut short or corrupt"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "do not match its data_offsets"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8, "do not match its data_offsets"),
        ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "not the JSON object.*X9"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "not the JSON object.*-2"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}, b"\0" * 8, "not the JSON object"),
        (
            {
                "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
            },
            b"\0" * 6,
            "overlaps the one before or leaves a gap.*`b`",
        ),
        (
            {
                "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]},
            },
            b"\0" * 6,
            "overlaps the one before or leaves a gap.*`b`",
        ),
        ({"__metadata__": {"k": "v"}}, b"", "no tensors"),
        ({"__metadata__": {"k": 1}, "a": {"dtype": "U8", "shape": [], "data_offsets": [0, 1]}}, b"\0", "strings"),
    ],
)
def test_safetensors_check(tmp_path, header, data, reason):
    path = write(tmp_path / "t.safetensors", header, data)
    if reason is None:
        assert safetensors_metadata(path) == {}
    else:
        with pytest.raises(InvalidSafetensors, match=reason):
            safetensors_metadata(path)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x01\x02", "shorter than the 8-byte"),
        (struct.pack("<Q", 1000) + b"{}", "header length impossible"),
        (struct.pack("<Q", 4) + b"nope", "not the JSON object"),
        (struct.pack("<Q", 2) + b"[]", "not the JSON object"),
    ],
)
def test_safetensors_check_of_broken_headers(tmp_path, raw, reason):
    path = tmp_path / "t.safetensors"
    path.write_bytes(raw)
    with pytest.raises(InvalidSafetensors, match=reason):
        safetensors_metadata(path)


def test_a_far_too_long_chunk_is_refused_without_decoding(service, workspace, started):
    before = snapshot(workspace)
    with pytest.raises(ServiceError, match=r"chunk 0 is about \d+ bytes but must be exactly 65536 bytes"):
        service.append(started, "A" * (4 * CHUNK), 0)
    assert snapshot(workspace) == before


def test_a_finish_cut_short_after_landing_the_file_completes_when_called_again(service, workspace, lora_bytes, started):
    send_all(service, lora_bytes)
    (workspace / "loras").mkdir()
    target = workspace / "loras" / "my_lora.safetensors"
    os.link(workspace / "uploads" / started / "data.part", target)  # where a crash would have left it
    finished = service.finish(started)
    assert finished.path == str(target) and target.read_bytes() == lora_bytes
    assert json.loads(target.with_suffix(".json").read_text())["trigger_words"] == ["xyz_style", "xyz"]
    assert not (workspace / "uploads" / started).exists()


def test_concurrent_appends_and_finishes(workspace, lora_bytes):
    from concurrent.futures import ThreadPoolExecutor

    start(UploadService(workspace), lora_bytes)
    parts = pieces(lora_bytes)
    jobs = list(enumerate(parts)) * 3
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: UploadService(workspace).append("u1", b64(job[1]), job[0]), jobs))
    assert max(r.received_chunks for r in results) == 5

    def finish(_):
        try:
            return UploadService(workspace).finish("u1").path
        except ServiceError as exc:
            return str(exc)

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(finish, range(4)))
    target = str(workspace / "loras" / "my_lora.safetensors")
    assert outcomes.count(target) == 1
    assert all("already finished" in o for o in outcomes if o != target)
    assert Path(target).read_bytes() == lora_bytes
