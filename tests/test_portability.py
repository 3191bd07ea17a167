"""Process, lock, path and name handling as Windows and macOS get it, tested here through the same
portable calls: the stop-request file with no signal sent, liveness by pid and create time, filelock
between processes, Windows path rules through ntpath, and Linux-only calls kept in one module."""

from __future__ import annotations

import ntpath
import posixpath
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import fast_config

from server.errors import ServiceError
from server.jobs import JobService
from server.names import checked_name, is_safe_name, plain_filename_problem
from server.paths import allowed_dirs, is_within, looks_like_path, path_from_file_uri
from server.upload_store import UploadStore
from training import processes
from training.background_job import StopRequest
from training.jobs.store import JobRecord, JobStore
from training.run_files import RunFiles

ROOT = Path(__file__).resolve().parent.parent
PLATFORM_MODULE = ROOT / "training" / "processes.py"
LINUX_ONLY = re.compile(r"os\.killpg|/proc\b|\bfcntl\b|os\.setsid|start_new_session|os\.p(read|write)\b")


def test_linux_only_calls_live_in_the_platform_module():
    sources = [*(ROOT / "server").rglob("*.py"), *(ROOT / "training").rglob("*.py")]
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sources
        if path != PLATFORM_MODULE
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if LINUX_ONLY.search(line)
    ]
    assert found == []
    assert LINUX_ONLY.search(PLATFORM_MODULE.read_text(encoding="utf-8"))  # the pattern finds what it looks for


# --- processes -------------------------------------------------------------------------------------
def start_sleeper(folder: Path, *, with_child: bool = False) -> subprocess.Popen:
    """A real detached `python -m sleeper` (optionally with a child of its own), as jobs are started."""
    body = "import time\n"
    if with_child:
        body += "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    (folder / "sleeper.py").write_text(body + "time.sleep(60)\n")
    return subprocess.Popen(
        [sys.executable, "-m", "sleeper"], cwd=folder, stdin=subprocess.DEVNULL, **processes.detached_options()
    )


def test_liveness_needs_the_module_and_the_create_time(tmp_path):
    child = start_sleeper(tmp_path)
    try:
        started = processes.create_time(child.pid)
        assert started is not None and abs(started - time.time()) < 30
        assert processes.runs_module(child.pid, "sleeper", started)
        assert processes.runs_module(child.pid, "sleeper")  # a record from before create times
        assert not processes.runs_module(child.pid, "sleeper", started - 3600.0)  # a reused pid: started an hour apart
        assert not processes.runs_module(child.pid, "training.cli", started)
    finally:
        processes.kill_tree(child.pid)
        child.wait(timeout=30)
    assert not processes.runs_module(child.pid, "sleeper", started)
    assert processes.create_time(child.pid) is None


def test_kill_tree_ends_the_child_and_what_it_started(tmp_path):
    child = start_sleeper(tmp_path, with_child=True)
    parent = psutil.Process(child.pid)
    deadline = time.monotonic() + 30
    while not parent.children() and time.monotonic() < deadline:
        time.sleep(0.05)
    (grandchild,) = parent.children()
    processes.kill_tree(child.pid)
    child.wait(timeout=30)
    psutil.wait_procs([grandchild], timeout=30)
    assert not grandchild.is_running()


def test_a_job_stops_through_the_stop_request_file_with_no_signal(tmp_path, tiny_sd15, shapes, monkeypatch):
    """What Windows does: no signal reaches the detached trainer; the file stops it after its step, with
    a checkpoint, and the trainer removes the file as it ends."""
    signalled = []
    monkeypatch.setattr(processes, "interrupt_group", signalled.append)
    (tmp_path / "models").symlink_to(tiny_sd15.parent)
    service = JobService(tmp_path, stop_timeout=120)
    job = service.start("filestop", fast_config(shapes, steps=100000, batch_size=1).to_yaml())
    deadline = time.monotonic() + 240
    while service.status(job.job_id).step < 2:
        assert time.monotonic() < deadline and service.status(job.job_id).state == "running"
        time.sleep(0.1)
    record = service.store.get(job.job_id)
    assert record.pid_created_at == processes.create_time(record.pid)

    service.stop(job.job_id)
    assert signalled == [record.pid]  # asked, and nothing was sent
    while (status := service.status(job.job_id)).state == "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status.state == "stopped" and status.last_checkpoint and status.step >= 2
    assert Path(status.last_checkpoint).name == f"step{status.step:06d}"
    run = RunFiles(Path(status.run_dir))
    assert "stop requested (stop-request)" in run.log.read_text()
    assert not run.stop_requested()


def test_resume_forgets_a_stop_request_the_child_never_read(tmp_path):
    service = JobService(tmp_path, python=shutil.which("false"))  # the resumed child is not what is tested
    run_dir = tmp_path / "runs" / "never-read"
    run_dir.mkdir(parents=True)
    service.store.insert(
        JobRecord(job_id="never-read", config_name="c", state="stopped", run_dir=str(run_dir), created_at=time.time())
    )
    files = RunFiles(run_dir)
    files.request_stop()
    assert files.stop_requested()
    service.resume("never-read")
    assert not files.stop_requested()


def test_a_background_jobs_stop_is_the_signal_or_the_file(tmp_path):
    files = RunFiles(tmp_path)
    stop = StopRequest(files)
    assert not stop.is_set()
    files.request_stop()
    assert stop.is_set()
    files.clear_stop_request()
    assert not stop.is_set()
    stop.set()  # what SIGINT/SIGTERM do
    assert stop.is_set()


def test_a_job_table_from_before_create_times_gains_the_column(tmp_path):
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute(
            "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, kind TEXT NOT NULL DEFAULT 'training', config_name TEXT "
            "NOT NULL, state TEXT NOT NULL, run_dir TEXT NOT NULL, pid INTEGER, resume INTEGER NOT NULL DEFAULT 0, "
            "stop_requested_at REAL, created_at REAL NOT NULL, started_at REAL, finished_at REAL, error TEXT)"
        )
        db.execute(
            "INSERT INTO jobs (job_id, config_name, state, run_dir, created_at) VALUES ('a', 'c', 'stopped', 'r', 1)"
        )
    (record,) = JobStore(tmp_path / "state.db").all()
    assert record.job_id == "a" and record.pid_created_at is None


# --- locks -----------------------------------------------------------------------------------------
HOLD_IN_ANOTHER_PROCESS = """
import sys, time
from pathlib import Path
from server.upload_store import UploadStore
with UploadStore(Path(sys.argv[1])).locked("u1") as upload:
    print("held", upload.upload_id, flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_an_upload_lock_excludes_another_process(tmp_path):
    from server.upload_store import UploadRecord

    store = UploadStore(tmp_path / "uploads")
    record = UploadRecord(
        upload_id="u1", filename="a.safetensors", total_size=10, chunk_size=10, sha256=None, metadata={}, created_at=0
    )
    assert store.create(record)
    other = subprocess.Popen(
        [sys.executable, "-c", HOLD_IN_ANOTHER_PROCESS, str(store.folder), "1.5"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert other.stdout.readline().split() == ["held", "u1"]
    waited = time.monotonic()
    with store.locked("u1") as upload:
        waited = time.monotonic() - waited
        assert upload is not None and upload.upload_id == "u1"
    assert waited > 1.0  # it waited for the other process to let go
    assert other.wait(timeout=30) == 0


def test_locking_a_missing_upload_writes_nothing(tmp_path):
    store = UploadStore(tmp_path / "uploads")
    with store.locked("nothing") as upload:
        assert upload is None
    assert not tmp_path.joinpath("uploads").exists() and list(tmp_path.iterdir()) == []


# --- paths -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flavour", "path", "roots", "inside"),
    [
        (ntpath, r"c:\Users\Me\Data\set", [r"C:\users\me\data"], True),  # Windows: case does not matter
        (ntpath, r"C:\Users\Me\Data", [r"C:\Users\Me\Data"], True),
        (ntpath, r"C:\Users\Me\Database", [r"C:\Users\Me\Data"], False),
        (ntpath, r"D:\Users\Me\Data", [r"C:\Users\Me\Data"], False),  # another drive
        (ntpath, r"\\server\share\sets\a", [r"\\SERVER\Share"], True),  # a UNC share
        (ntpath, r"\\server\other\sets", [r"\\server\share"], False),
        (ntpath, "C:/Users/Me/Data/set", [r"C:\Users\Me\Data"], True),  # forward slashes too
        (posixpath, "/home/me/Data/set", ["/home/me/data"], False),  # here: case matters
        (posixpath, "/home/me/data/set", ["/srv", "/home/me/data"], True),
        (posixpath, "/home/me/database", ["/home/me/data"], False),
    ],
)
def test_containment_follows_the_platforms_path_rules(flavour, path, roots, inside):
    assert is_within(path, roots, flavour) is inside


def test_allowed_dirs_are_split_at_the_platforms_separator():
    assert allowed_dirs(r"C:\data;D:\more sets;", ntpath) == [r"C:\data", r"D:\more sets"]
    assert allowed_dirs("/data:/srv/sets", posixpath) == ["/data", "/srv/sets"]


@pytest.mark.parametrize(
    ("flavour", "value", "is_path"),
    [
        (ntpath, "C:sets", True),  # drive-relative
        (ntpath, r"sets\portraits", True),
        (ntpath, r"\\server\share", True),
        (ntpath, "my-dataset", False),
        (posixpath, "C:sets", False),  # a plain name here
        (posixpath, "sets/portraits", True),
        (posixpath, "~/sets", True),
        (posixpath, "my-dataset", False),
    ],
)
def test_what_looks_like_a_path(flavour, value, is_path):
    assert looks_like_path(value, flavour) is is_path


def test_client_roots_from_file_uris():
    assert path_from_file_uri("file:///C:/Users/me/My%20Sets", ntpath) == r"C:\Users\me\My Sets"
    assert path_from_file_uri("file://server/share/sets", ntpath) == r"\\server\share\sets"
    assert path_from_file_uri("file:///home/me/My%20Sets", posixpath) == "/home/me/My Sets"
    assert path_from_file_uri("https://example.com/sets", ntpath) is None


# --- names -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["CON", "nul", "Com1", "lpt9", "aux.yaml", "PRN.safetensors", "NUL.tar.gz"])
def test_windows_device_names_are_refused(name, tmp_path):
    assert not is_safe_name(name)
    with pytest.raises(ServiceError, match="device name on Windows"):
        checked_name("dataset", name)
    assert "device name" in plain_filename_problem(name)
    with pytest.raises(ServiceError, match="config name"):
        JobService(tmp_path).start(name, "name: x\n")


@pytest.mark.parametrize("name", ["console", "CONTROL", "com10", "nullable", "lpt", "my-con"])
def test_names_that_only_resemble_devices_are_kept(name):
    assert is_safe_name(name) and checked_name("dataset", name) == name
    assert plain_filename_problem(name) is None


def test_a_file_name_with_a_drive_or_stream_is_refused():
    assert "':'" in plain_filename_problem("C:evil.png")
    assert "':'" in plain_filename_problem("image.png:hidden")


def test_system_stats_name_an_apple_gpu_only_on_apple_silicon(monkeypatch, tmp_path):
    """get-system-stats on a Mac with Apple silicon names its GPU and unified memory (no NVIDIA driver
    there); on other machines without NVML it names none. platform is what the server reads to tell."""
    import platform

    from server.system import system_stats

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no NVIDIA GPU, whatever this machine has
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    stats = system_stats(tmp_path, [])
    assert stats.gpu_name == "Apple GPU (MPS)"
    assert stats.gpu_memory_total_gb == stats.ram_total_gb and stats.gpu_memory_free_gb is None
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    assert system_stats(tmp_path, []).gpu_name is None


def test_the_signal_after_a_stop_file_is_a_first_stop_not_a_second(tmp_path):
    """stop-training writes the stop-request file and then sends SIGTERM: a trainer that already read the
    file must still finish its step and save, not take the signal for a second stop (interrupt at once).
    Only a second signal interrupts."""
    import os
    import signal

    import pytest

    from training.stop_signals import stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    stop_requests = []  # the trainer has already read the stop file when the server's SIGTERM comes
    with stop_on_signals(lambda: stop_requests.append("signal")):
        os.kill(os.getpid(), signal.SIGTERM)  # the server's fast path, right after the file: no interrupt
        assert stop_requests == ["signal"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal: interrupt at once
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
