"""Service calls side by side (issue 13): real threads on the real services, and the real server over
stdio. Calls on one named thing exclude each other (per-name locks, SQLite transactions) and say why
they were refused; calls on different things, and reads, wait for no one."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from conftest import fast_config
from test_mcp_server import run_session

from training import processes
from server.configs import ConfigService
from server.datasets import DatasetService
from server.errors import ServiceError, WorkspaceStateError
from server.jobs import JobService
from server.name_locks import name_lock
from training.data.synthetic import make_shape_dataset

THREADS = 8


def side_by_side(calls: list[Callable[[], object]]) -> tuple[list[object], list[Exception]]:
    """Run `calls` in threads released together by a barrier; their results and their errors."""
    barrier = threading.Barrier(len(calls))
    results: list[object] = []
    errors: list[Exception] = []

    def run(call: Callable[[], object]) -> None:
        barrier.wait()
        try:
            results.append(call())
        except Exception as exc:  # collected, and asserted on by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a call never returned"
    return results, errors


@pytest.fixture
def sleeper(tmp_path) -> str:
    """A stand-in interpreter whose 'job' sleeps: started jobs stay running, and nothing trains."""
    path = tmp_path / "sleeping-python"
    path.write_text("#!/bin/sh\nexec sleep 120\n")
    path.chmod(0o755)
    return str(path)


def test_concurrent_starts_of_one_config_make_exactly_one_job(tmp_path, shapes, sleeper):
    jobs = JobService(tmp_path, python=sleeper)
    yaml = fast_config(shapes).to_yaml()
    try:
        started, errors = side_by_side([lambda: jobs.start("same", yaml)] * THREADS)
        assert len(started) == 1, [str(e) for e in errors]
        assert len(errors) == THREADS - 1
        for error in errors:
            assert isinstance(error, WorkspaceStateError)
            assert f"already has training job {started[0].job_id}" in str(error)
        assert [job.job_id for job in jobs.list() if job.config_name == "same"] == [started[0].job_id]
        assert [run.name for run in (tmp_path / "runs").iterdir()] == [started[0].job_id]  # refused runs leave none
    finally:
        for record in jobs.store.all():
            if record.pid:
                processes.kill_tree(record.pid)


def test_a_job_change_decided_on_an_old_read_does_not_overwrite_a_newer_state(tmp_path, shapes, sleeper):
    jobs = JobService(tmp_path, python=sleeper)
    job = jobs.start("one", fast_config(shapes).to_yaml())
    try:
        # What a stop or a reconcile read as `running` has since been stopped by another call: their
        # change, made only while the row is as they read it, is refused and says so.
        assert jobs.store.update(job.job_id, state="stopped")
        assert not jobs.store.update(job.job_id, only_if={"state": "queued"}, state="running")
        assert not jobs.store.update(
            job.job_id, only_if={"state": "running", "started_at": job.started_at}, state="interrupted"
        )
        assert jobs.store.get(job.job_id).state == "stopped"
    finally:
        processes.kill_tree(job.pid)


def test_concurrent_creates_of_one_config_name_leave_one_valid_config(tmp_path, shapes):
    configs = ConfigService(tmp_path)
    values = [
        {"name": "same", "model_name": "builtin:tiny-sd15", "dataset_path": str(shapes), "steps": 100 + i}
        for i in range(THREADS)
    ]
    created, errors = side_by_side([lambda v=v: configs.create(v) for v in values])
    assert len(created) == 1, [str(e) for e in errors]
    assert len(errors) == THREADS - 1
    assert all(isinstance(e, WorkspaceStateError) and "already exists" in str(e) for e in errors)
    assert configs.get("same").steps == created[0].steps  # the file is the one creator's, whole
    assert [p.name for p in (tmp_path / "configs").iterdir()] == ["same.yaml"]  # no temporary file left


def test_concurrent_caption_edits_of_one_dataset_all_land(tmp_path):
    folder = tmp_path / "datasets" / "set"
    make_shape_dataset(folder, 6)
    originals = {p.name: p.read_text() for p in folder.glob("*.txt")}
    datasets = DatasetService(tmp_path)
    words = [f"tw{i}" for i in range(THREADS)]
    # Each call reads every caption and writes it back with its word first: without one writer at a
    # time, a call writes over captions another call had just changed, and that word is lost.
    _, errors = side_by_side([lambda w=w: datasets.update_captions("set", trigger_word=w) for w in words])
    assert not errors, errors
    for name, original in originals.items():
        caption = (folder / name).read_text()
        assert caption.endswith(original), caption  # whole: never a torn or empty file
        assert sorted(caption.removesuffix(original).replace(",", " ").split()) == sorted(words), caption


def test_a_name_lock_excludes_threads_and_processes_but_not_other_names(tmp_path):
    with name_lock(tmp_path, "dataset", "busy"):
        refused = pytest.raises(ServiceError, match="dataset 'busy' is being changed by another call")
        with refused, name_lock(tmp_path, "dataset", "busy", wait_s=0.05):
            pass
        with name_lock(tmp_path, "dataset", "other", wait_s=0.05):  # another name: free
            pass
        probe = (
            "import sys; from server.name_locks import name_lock; from server.errors import ServiceError\n"
            "try:\n    with name_lock(sys.argv[1], 'dataset', 'busy', wait_s=0.05): print('taken')\n"
            "except ServiceError: print('refused')"
        )
        repo = Path(__file__).resolve().parent.parent
        ran = subprocess.run(
            [sys.executable, "-c", probe, str(tmp_path)], cwd=repo, capture_output=True, text=True, timeout=60
        )
        assert ran.stdout.strip() == "refused", ran.stderr
    with name_lock(tmp_path, "dataset", "busy", wait_s=0.05):  # released
        pass


def test_the_server_answers_other_calls_while_get_dataset_info_runs(tmp_path, tiny_sd15):
    workspace = tmp_path / "ws"
    # Big enough that one inspection takes far longer than a listing (about 1 s against ~10 ms here).
    make_shape_dataset(workspace / "datasets" / "big", 120, size=(384, 384))
    finished: list[str] = []

    async def script(session):
        async def inspect() -> None:
            result = await session.call_tool("get-dataset-info", {"dataset_name": "big"})
            assert not result.is_error, result.content
            assert result.structured_content["images"] == 120
            finished.append("get-dataset-info")

        async with anyio.create_task_group() as group:
            group.start_soon(inspect)
            await anyio.sleep(0.3)  # the inspection's request goes first and is under way
            for tool in ("list-configs", "list-training-jobs", "list-datasets"):
                result = await session.call_tool(tool, {})
                assert not result.is_error, result.content
                finished.append(tool)

    run_session(workspace, script)
    # With one lock over every call, each listing waited for the whole inspection.
    assert finished == ["list-configs", "list-training-jobs", "list-datasets", "get-dataset-info"]
