"""Publishing a LoRA into loras/ (training/published_loras.py): never over another job's file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.published_loras import publish


def write(data: bytes):
    return lambda tmp: Path(tmp).write_bytes(data)


def claim(folder: Path, name: str, job_id: str | None, data: bytes) -> Path:
    target = publish(folder, name, job_id, write(data))
    target.with_suffix(".json").write_text(json.dumps({"job_id": job_id}))
    return target


def test_a_later_job_gets_a_numbered_name_and_a_job_replaces_only_its_own_file(tmp_path):
    first = claim(tmp_path, "style", "job-a", b"a")
    second = claim(tmp_path, "style", "job-b", b"b")
    third = claim(tmp_path, "style", None, b"elsewhere")  # no job: never anyone's own
    again = claim(tmp_path, "style", "job-b", b"b2")
    assert [p.name for p in (first, second, third, again)] == [
        "style.safetensors", "style-2.safetensors", "style-3.safetensors", "style-2.safetensors"
    ]
    assert [p.read_bytes() for p in (first, second, third)] == [b"a", b"b2", b"elsewhere"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors") == [
        "style-2.safetensors", "style-3.safetensors", "style.safetensors"
    ]  # no temporary file left


def test_a_file_without_sidecar_or_a_failed_write_is_never_replaced(tmp_path):
    (tmp_path / "style.safetensors").write_bytes(b"uploaded")  # a file from elsewhere, its sidecar not yet there
    assert publish(tmp_path, "style", "job-a", write(b"a")).name == "style-2.safetensors"

    def fails(tmp):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish(tmp_path, "style", "job-a", fails)
    assert (tmp_path / "style.safetensors").read_bytes() == b"uploaded"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style-2.safetensors", "style.safetensors"]
