"""Publishing a LoRA into loras/ (training/published_loras.py): never over another job's file."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.published_loras import NameTaken, copy_to_new_name, publish


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


def test_an_exact_name_taken_while_the_file_is_written_is_refused_and_kept(tmp_path):
    """merge-loras checks its output_name, then merges for seconds; a job that completes meanwhile and
    publishes that name keeps its file, and the merge is refused (or numbered, without an exact name)."""

    def merge_while_a_job_completes(tmp):
        claim(tmp_path, "style", "job-a", b"the job's LoRA")  # the trainer's child, during the merge
        Path(tmp).write_bytes(b"merged")

    with pytest.raises(NameTaken, match="style.safetensors exists already"):
        publish(tmp_path, "style", None, merge_while_a_job_completes, exact=True)
    assert (tmp_path / "style.safetensors").read_bytes() == b"the job's LoRA"

    def convert_while_a_job_completes(tmp):
        claim(tmp_path, "other", "job-b", b"the job's LoRA")
        Path(tmp).write_bytes(b"converted")

    numbered = publish(tmp_path, "other", None, convert_while_a_job_completes)
    assert numbered.name == "other-2.safetensors" and numbered.read_bytes() == b"converted"
    assert (tmp_path / "other.safetensors").read_bytes() == b"the job's LoRA"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_without_hard_links_a_copy_takes_only_a_free_name_and_leaves_no_half_file(tmp_path):
    """publish's way on filesystems without hard links (FAT, some network drives): an exclusive create and a
    copy. The failed copy is real: the child's file-size limit (RLIMIT_FSIZE) stops its writes at 1 MiB of 3."""
    source = tmp_path / "staged.safetensors"
    source.write_bytes(os.urandom(3 << 20))
    copied = tmp_path / "style.safetensors"
    copy_to_new_name(source, copied)
    assert copied.read_bytes() == source.read_bytes()
    with pytest.raises(FileExistsError):
        copy_to_new_name(tmp_path / "other.safetensors", copied)  # checked before the source is even opened
    assert copied.read_bytes() == source.read_bytes()

    child = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(source), str(tmp_path / "full.safetensors")],
        cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120,
    )
    assert child.stdout.strip() == f"OSError {errno.EFBIG}", child.stderr
    assert not (tmp_path / "full.safetensors").exists()


FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from training.published_loras import copy_to_new_name
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    copy_to_new_name(Path(sys.argv[1]), Path(sys.argv[2]))
except OSError as exc:
    print("OSError", exc.errno)
"""
