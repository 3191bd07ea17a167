"""The queue below server and trainer (issue 14, part 2): devices handed to jobs (LORA_MCP_GPUS pretends
to have GPUs on this CPU), never one to two jobs, even from several processes at once; queued jobs that
run to the end with no server; delete-job and prune-runs; a state.db from the previous version.

Jobs whose subject is the allocation run a stand-in child (`python=` of JobService, as in
test_concurrency): a real process started by the real spawn, which records the CUDA_VISIBLE_DEVICES it
got and its command line, then holds its devices until the test releases it (or for STANDIN_HOLD_S)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import fast_config

from server.errors import ServiceError, WorkspaceStateError
from server.jobs import CANCELLED, JobService, PruneRequest
from server.system import system_stats
from training import processes
from training.jobs.devices import SHARED_CAPTION_MODEL_BYTES, captioning_devices, machine_devices, training_devices
from training.jobs.queue import JobQueue, finish_and_start_next
from training.jobs.store import JobRecord, JobStore, QueueError

ROOT = Path(__file__).resolve().parent.parent
STANDIN = """#!{python}
import json, os, sys, time
from pathlib import Path

args = sys.argv[1:]  # -m MODULE ...: the run directory follows --run-dir or --resume, else it is the argument
run = Path(args[args.index("--run-dir") + 1] if "--run-dir" in args else
           args[args.index("--resume") + 1] if "--resume" in args else args[2])
started = time.time()
with open(run / "starts.jsonl", "a") as f:
    f.write(json.dumps({{"devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "args": args, "at": started}}) + "\\n")
hold = float(os.environ.get("STANDIN_HOLD_S", "600"))
while not (run / "release").exists() and time.time() - started < hold:
    time.sleep(0.02)
ended = time.time()
(run / "status.json").write_text(json.dumps({{"state": "completed", "ended_at": ended, "started_at": started}}))
"""


@pytest.fixture
def standin(tmp_path) -> str:
    path = tmp_path / "standin-python"
    path.write_text(STANDIN.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def three_gpus(monkeypatch):
    monkeypatch.setenv("LORA_MCP_GPUS", "0,1,2")


def starts(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "starts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def end_all(service: JobService) -> None:
    for record in service.store.all():
        Path(record.run_dir, "release").touch()
        if record.pid and record.state == "running":
            processes.kill_tree(record.pid)


def release(service: JobService, job_id: str) -> None:
    """Let a stand-in job end, and wait until the queue has seen it end."""
    Path(service.store.get(job_id).run_dir, "release").touch()
    wait_for(lambda: service.status(job_id).state == "completed", f"{job_id} completed")


def test_the_machines_devices_and_what_a_captioning_job_takes(monkeypatch, tmp_path, tiny_git):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-5d2f,-1,0")  # CUDA stops at the first invalid entry
    monkeypatch.delenv("LORA_MCP_GPUS", raising=False)
    assert machine_devices() == ["3", "GPU-5d2f"]
    monkeypatch.setenv("LORA_MCP_GPUS", "0, 1")  # the override wins
    assert machine_devices() == ["0", "1"]
    monkeypatch.setenv("LORA_MCP_GPUS", "")
    assert machine_devices() == []

    assert captioning_devices("template") == 0
    assert captioning_devices(str(tiny_git)) == 0  # small: shares
    large = tmp_path / "large-model"
    large.mkdir()
    with open(large / "model.safetensors", "wb") as f:  # sparse: its size without the disk space
        f.truncate(SHARED_CAPTION_MODEL_BYTES + 1)
    assert captioning_devices(str(large)) == 1


def test_jobs_get_their_own_devices_and_a_two_device_job_is_not_overtaken(tmp_path, shapes, standin, three_gpus):
    service = JobService(tmp_path, python=standin)
    one = fast_config(shapes).to_yaml()
    try:
        jobs = [service.start(name, one) for name in ("a", "b", "c")]
        assert [job.state for job in jobs] == ["running"] * 3
        held = [service.status(job.job_id).devices for job in jobs]
        assert sorted(device for devices in held for device in devices) == ["0", "1", "2"]
        for job, devices in zip(jobs, held, strict=True):  # each child saw only its own device
            seen = wait_for(lambda job=job: starts(job.run_dir), f"{job.job_id} started")
            assert [start["devices"] for start in seen] == [",".join(devices)]

        pair = service.start("pair", fast_config(shapes, num_processes=2).to_yaml())
        single = service.start("single", one)
        assert (pair.state, single.state) == ("queued", "queued")
        stats = system_stats(tmp_path, service.list())
        assert {use.device: use.job_id for use in stats.devices} == {
            devices[0]: job.job_id for job, devices in zip(jobs, held, strict=True)
        }

        restarted = JobService(tmp_path, python=standin)  # a new server: the allocation is the table's
        assert [restarted.status(job.job_id).devices for job in jobs] == held
        release(restarted, jobs[0].job_id)
        # One device is free, the 2-device job still waits, and the 1-device job behind it does not overtake it.
        assert (restarted.status(pair.job_id).state, restarted.status(single.job_id).state) == ("queued", "queued")
        assert restarted.status(jobs[0].job_id).devices == []  # a finished job holds none

        release(restarted, jobs[1].job_id)
        status = restarted.status(pair.job_id)
        assert status.state == "running" and sorted(status.devices) == sorted(held[0] + held[1])
        seen = wait_for(lambda: starts(pair.run_dir), "the pair started")
        assert sorted(seen[0]["devices"].split(",")) == sorted(held[0] + held[1])
        assert restarted.status(single.job_id).state == "queued"  # c still holds the third

        release(restarted, jobs[2].job_id)
        assert restarted.status(single.job_id).devices == held[2]
    finally:
        end_all(service)


def test_a_job_asking_more_devices_than_the_machine_has_is_refused(tmp_path, shapes, standin, three_gpus):
    service = JobService(tmp_path, python=standin)
    with pytest.raises(ServiceError, match=r"asks for 4 GPUs .* this machine has 3 \(0, 1, 2; LORA_MCP_GPUS"):
        service.start("big", fast_config(shapes, num_processes=4).to_yaml())
    with pytest.raises(ServiceError, match="spans 2 machines .* `lora-train CONFIG --machine-rank"):
        service.start("far", fast_config(shapes, num_machines=2).to_yaml())
    assert service.list() == [] and not (tmp_path / "runs").exists()


def test_a_jobs_devices_are_its_num_processes_as_the_trainer_reads_the_config(tmp_path, shapes, three_gpus):
    yaml = fast_config(shapes).to_yaml()
    assert training_devices(yaml.replace("num_processes: 1", 'num_processes: "2"'), ["0", "1", "2"]) == 2
    for broken, problem in ((yaml + "rank: [4\n", "not valid YAML"), (yaml.replace("rank: 4", "rank: many"), "rank")):
        with pytest.raises(QueueError, match=problem):
            training_devices(broken, ["0"])
    service = JobService(tmp_path)
    with pytest.raises(ServiceError, match="(?s)invalid training config: .*validate-training-config"):
        service.start("broken", yaml + "rank: [4\n")
    assert service.list() == []


def test_without_gpus_one_device_job_runs_at_a_time_whatever_its_processes(tmp_path, shapes, standin, monkeypatch):
    monkeypatch.setenv("LORA_MCP_GPUS", "")  # a CPU (or Apple) machine: one shared device
    service = JobService(tmp_path, python=standin)
    try:
        first = service.start("first", fast_config(shapes, num_processes=2).to_yaml())
        second = service.start("second", fast_config(shapes).to_yaml())
        assert (first.state, second.state) == ("running", "queued")
        assert service.status(first.job_id).devices == ["cpu"]
        assert wait_for(lambda: starts(first.run_dir), "started")[0]["devices"] is None  # the child's own choice
        assert service.stop(second.job_id).error == CANCELLED  # cancelled before it started
        assert not starts(second.run_dir)
    finally:
        end_all(service)


CONTENDER = """
import sys, time
from pathlib import Path
from server.jobs import JobService

workspace, python, index = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
yaml = Path(sys.argv[4]).read_text()
service = JobService(workspace, python=python)
mine = [service.start(f"p{index}-{k}", yaml.replace("num_processes: 1", f"num_processes: {1 + (index + k) % 2}")).job_id
        for k in range(3)]
deadline = time.monotonic() + 120
while time.monotonic() < deadline and any(service.status(job).state != "completed" for job in mine):
    time.sleep(0.01)
"""


def test_several_processes_starting_jobs_at_once_never_share_a_device(tmp_path, shapes, standin, three_gpus):
    yaml = tmp_path / "config.yaml"
    yaml.write_text(fast_config(shapes).to_yaml())
    assert "num_processes: 1" in yaml.read_text()
    environment = {**os.environ, "STANDIN_HOLD_S": "0.3"}
    contenders = [
        subprocess.Popen(
            [sys.executable, "-c", CONTENDER, str(tmp_path), standin, str(index), str(yaml)],
            cwd=ROOT,
            env=environment,
        )
        for index in range(3)
    ]
    store = JobStore(tmp_path / "state.db")
    snapshots = 0
    try:
        while any(contender.poll() is None for contender in contenders):
            running = [record.device_ids for record in store.all() if record.state == "running"]
            held = [device for devices in running for device in devices]
            assert len(held) == len(set(held)), f"a device given twice: {running}"
            snapshots += 1
            time.sleep(0.01)
        assert [contender.returncode for contender in contenders] == [0, 0, 0]
    finally:
        for contender in contenders:
            contender.kill()
    records = store.all()
    assert len(records) == 9 and {record.state for record in records} == {"completed"}, records
    assert snapshots > 10
    # What the children themselves saw, over time: each started once, with as many devices as it asked for,
    # and no two of them held one device at the same time.
    intervals = []
    for record in records:
        (start,) = starts(record.run_dir)
        devices = start["devices"].split(",")
        assert len(devices) == record.devices_wanted
        ended = json.loads(Path(record.run_dir, "status.json").read_text())["ended_at"]
        intervals += [(device, start["at"], ended) for device in devices]
    for device, begin, end in intervals:
        overlapping = [other for other in intervals if other[0] == device and other[1] < end and begin < other[2]]
        assert len(overlapping) == 1, f"device {device} held by two jobs at once: {overlapping}"


def test_jobs_queued_before_every_server_exits_all_complete_each_once(tmp_path, shapes, tiny_sd15, monkeypatch):
    monkeypatch.setenv("LORA_MCP_GPUS", "")  # one device: the three run one after another
    (tmp_path / "models").symlink_to(tiny_sd15.parent)
    service = JobService(tmp_path)
    ids = [service.start(name, fast_config(shapes, steps=2).to_yaml()).job_id for name in ("n1", "n2", "n3")]
    assert [service.store.get(job_id).state for job_id in ids] == ["running", "queued", "queued"]
    del service  # the server exits: no refresh, no monitor from here on; only the children run the queue
    store = JobStore(tmp_path / "state.db")  # read only: a read never claims

    def ended() -> list[JobRecord] | None:
        records = store.all()
        return records if all(record.state not in ("queued", "running") for record in records) else None

    records = wait_for(ended, "every queued job ended", timeout=300)
    assert [record.state for record in records] == ["completed"] * 3, [record.error for record in records]
    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == sorted(ids)
    for record in records:
        log = Path(record.run_dir, "process.log").read_text()
        assert log.count("done: ") == 1, log  # trained once
        assert record.devices is None
    assert records[0].finished_at <= records[1].started_at and records[1].finished_at <= records[2].started_at


def insert_running(store: JobStore, job_id: str, run_dir: Path, **fields) -> None:
    """A row as a claim leaves it: running since just now (within its start-up grace), no pid yet."""
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    fields = {"config_name": job_id, "created_at": now, "started_at": now, **fields}
    store.insert(JobRecord(job_id=job_id, state="running", run_dir=str(run_dir), **fields))


def test_the_end_of_job_hook_runs_only_in_a_queued_job_and_not_in_a_worker(tmp_path, monkeypatch):
    store = JobStore(tmp_path / "state.db")
    insert_running(store, "j", tmp_path / "runs" / "j", devices="cpu")
    (tmp_path / "runs" / "j" / "status.json").write_text(json.dumps({"state": "failed", "error": "out of memory"}))
    monkeypatch.setenv("LORA_MCP_HOME", str(tmp_path))
    finish_and_start_next()  # a user's own lora-train: no job id
    monkeypatch.setenv("LORA_MCP_JOB_ID", "j")
    monkeypatch.setenv("LOCAL_RANK", "1")
    finish_and_start_next()  # a data-parallel worker: its launcher does it
    assert store.get("j").state == "running"
    monkeypatch.delenv("LOCAL_RANK")
    finish_and_start_next()
    record = store.get("j")
    assert (record.state, record.error, record.devices) == ("failed", "out of memory", None)


@pytest.fixture
def lookalike():
    """A live process whose command line names training.cli, as a job's child started by another process:
    the queue can tell it is alive only from its pid and its status.json."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "training.cli"])
    yield process
    process.kill()
    process.wait()


def test_a_resumed_job_is_not_ended_by_the_status_its_previous_run_left(tmp_path, three_gpus, lookalike):
    run_dir = tmp_path / "runs" / "again"
    store = JobStore(tmp_path / "state.db")
    # Claimed just now by a resume: its child has not written yet.
    insert_running(store, "again", run_dir, resume=True, devices_wanted=2, devices="0,1")
    hour_ago = time.time() - 3600
    previous = {"state": "stopped", "step": 2, "started_at": hour_ago - 600, "heartbeat": hour_ago}
    previous["updated_at"] = hour_ago
    (run_dir / "status.json").write_text(json.dumps(previous))
    queue = JobQueue(tmp_path)
    queue.refresh()  # the child is being spawned (no pid yet)
    assert (store.get("again").state, store.get("again").devices) == ("running", "0,1")
    store.update("again", pid=lookalike.pid, pid_created_at=processes.create_time(lookalike.pid))
    queue.refresh()  # the child runs, still loading (a data-parallel job: its workers) before its first status
    assert (store.get("again").state, store.get("again").devices) == ("running", "0,1")

    lookalike.kill()  # this run ends and writes its own final state: that one is believed
    lookalike.wait()
    (run_dir / "status.json").write_text(json.dumps({**previous, "state": "completed", "updated_at": time.time()}))
    queue.refresh()
    assert (store.get("again").state, store.get("again").devices) == ("completed", None)


CRASHING_JOB = """
import sys
from training.jobs.queue import exit_as_job

def main():
    print("loading the model", flush=True)
    if sys.argv[1] == "crash":
        raise RuntimeError("CUDA out of memory")
    sys.exit(int(sys.argv[1]))

exit_as_job(main)
"""


def test_a_job_that_crashes_ends_with_its_traceback_as_the_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_MCP_GPUS", "")
    store = JobStore(tmp_path / "state.db")
    codes = {}
    for job_id, argument in (("crashed", "crash"), ("exited", "3")):
        run_dir = tmp_path / "runs" / job_id
        insert_running(store, job_id, run_dir, devices="cpu")
        with open(run_dir / "process.log", "ab") as output:  # as the queue's spawn gives it
            codes[job_id] = subprocess.run(
                [sys.executable, "-c", CRASHING_JOB, argument],
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "LORA_MCP_JOB_ID": job_id, "LORA_MCP_HOME": str(tmp_path)},
            ).returncode
    assert codes == {"crashed": 1, "exited": 3}
    crashed = store.get("crashed")
    assert crashed.state == "interrupted" and "RuntimeError: CUDA out of memory" in crashed.error, crashed.error
    assert "Traceback" in Path(crashed.run_dir, "process.log").read_text()
    assert store.get("exited").state == "interrupted" and store.get("exited").devices is None


def test_a_running_job_from_before_allocations_holds_every_device(tmp_path, three_gpus):
    service = JobService(tmp_path)
    insert_running(service.store, "old", tmp_path / "runs" / "old", devices=None)  # no process: within its grace
    stats = system_stats(tmp_path, service.list())
    assert {use.device: use.job_id for use in stats.devices} == {"0": "old", "1": "old", "2": "old"}
    assert service.status("old").devices == ["0", "1", "2"]


def finished_run(service: JobService, job_id: str, *, checkpoints: int, state: str = "completed") -> Path:
    """A finished training run on disk: config, validation rows (best at step 2), checkpoints of 1,000 bytes
    each, 3,000 bytes of latent cache and 500 of text cache, a LoRA of 100 bytes."""
    run_dir = service.workspace / "runs" / job_id
    (run_dir / "latent_cache").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(fast_config(service.workspace).to_yaml())
    rows = [{"kind": "validation", "step": step, "loss": 1.0 - 0.1 * (step == 2), "images": 2} for step in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for step in range(1, checkpoints + 1):
        folder = run_dir / "checkpoints" / f"step{step:06d}"
        folder.mkdir(parents=True)
        (folder / "lora.safetensors").write_bytes(b"x" * 1000)
    (run_dir / "latent_cache" / "000000.pt").write_bytes(b"x" * 3000)
    (run_dir / "text_cache").mkdir()
    (run_dir / "text_cache" / "000000.pt").write_bytes(b"x" * 500)
    (run_dir / "test-run.safetensors").write_bytes(b"x" * 100)
    now = time.time()
    service.store.insert(
        # Started just now: a running one is within its start-up grace, so it stays running without a process.
        JobRecord(job_id=job_id, config_name=job_id, state=state, run_dir=str(run_dir), created_at=now, started_at=now)
    )
    return run_dir


def tree(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_prune_runs_frees_old_checkpoints_and_caches_of_finished_jobs(tmp_path):
    service = JobService(tmp_path)
    old = finished_run(service, "old", checkpoints=4)
    other = finished_run(service, "other", checkpoints=1, state="stopped")
    busy = finished_run(service, "busy", checkpoints=3, state="running")
    before = {run: tree(run) for run in (old, other, busy)}
    kept = {run: (run / "config.yaml").stat().st_size + (run / "metrics.jsonl").stat().st_size + 100 for run in before}

    dry = service.prune(PruneRequest(dry_run=True))
    assert {run: tree(run) for run in (old, other, busy)} == before  # a dry run changes nothing
    report = service.prune(PruneRequest())
    assert dry.runs == report.runs and not report.dry_run
    by_id = {run.job_id: run for run in report.runs}
    assert set(by_id) == {"old", "other"}  # never the running job
    assert by_id["old"].bytes_before == 4 * 1000 + 3500 + kept[old]
    # The newest checkpoint (4) and the recommended one (2, lowest validation loss) stay; 1 and 3 and the caches go.
    assert by_id["old"].bytes_after == 2 * 1000 + kept[old]
    assert sorted(by_id["old"].removed) == [
        "checkpoints/step000001",
        "checkpoints/step000003",
        "latent_cache",
        "text_cache",
    ]
    assert sorted(p.name for p in (old / "checkpoints").iterdir()) == ["step000002", "step000004"]
    assert (by_id["other"].bytes_before, by_id["other"].bytes_after) == (1000 + 3500 + kept[other], 1000 + kept[other])
    assert report.bytes_before == sum(run.bytes_before for run in report.runs)
    assert report.bytes_after == sum(run.bytes_after for run in report.runs)
    assert tree(busy) == before[busy]

    again = service.prune(PruneRequest(job_id="old"))
    assert again.runs[0].removed == [] and again.bytes_before == again.bytes_after == by_id["old"].bytes_after
    with pytest.raises(WorkspaceStateError, match="busy is running; only a finished job .* stop-training it first"):
        service.prune(PruneRequest(job_id="busy", dry_run=True))
    with pytest.raises(ServiceError, match="keep_checkpoints must be at least 1: .* resume-training .* delete-job"):
        service.prune(PruneRequest(keep_checkpoints=0))
    assert sorted(p.name for p in (old / "checkpoints").iterdir()) == ["step000002", "step000004"]


def test_delete_job_removes_a_finished_job_and_its_run_but_refuses_others(tmp_path):
    service = JobService(tmp_path)
    done = finished_run(service, "done", checkpoints=2)
    exported = tmp_path / "loras" / "kept.safetensors"
    exported.parent.mkdir()
    exported.write_bytes(b"lora")
    deleted = service.delete("done")
    assert deleted.run_dir_removed and deleted.freed_bytes > 5000 and "kept" in deleted.note
    assert not done.exists() and service.store.get("done") is None and exported.read_bytes() == b"lora"

    for state in ("running", "queued"):  # the running one holds the machine: the queued one waits
        run = finished_run(service, state, checkpoints=1, state=state)
        with pytest.raises(WorkspaceStateError, match=f"{state}; only a finished job .* stop-training it first"):
            service.delete(state)
        assert run.is_dir() and service.store.get(state).state == state
    with pytest.raises(WorkspaceStateError, match="no job 'nope'"):
        service.delete("nope")
    with pytest.raises(ServiceError):
        service.delete("../runs")

    elsewhere = tmp_path / "elsewhere"  # a row naming a folder outside runs/: the row goes, the folder stays
    elsewhere.mkdir()
    service.store.insert(
        JobRecord(job_id="odd", config_name="c", state="failed", run_dir=str(elsewhere), created_at=time.time())
    )
    assert not service.delete("odd").run_dir_removed and elsewhere.is_dir() and service.store.get("odd") is None


# The job table as the previous version made it (before allocations), written literally.
OLD_SCHEMA = """CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY, kind TEXT NOT NULL DEFAULT 'training', config_name TEXT NOT NULL, state TEXT NOT NULL,
    run_dir TEXT NOT NULL, pid INTEGER, pid_created_at REAL, resume INTEGER NOT NULL DEFAULT 0,
    stop_requested_at REAL, created_at REAL NOT NULL, started_at REAL, finished_at REAL, error TEXT)"""


def test_a_state_db_from_the_previous_version_opens_shows_its_jobs_and_resumes(tmp_path, shapes, standin, three_gpus):
    runs = tmp_path / "runs"
    for job_id in ("old-done", "old-stopped", "old-captions"):
        (runs / job_id / "checkpoints" / "step000002").mkdir(parents=True)
    (runs / "old-stopped" / "config.yaml").write_text(fast_config(shapes).to_yaml())
    (runs / "old-stopped" / "status.json").write_text(json.dumps({"state": "stopped", "step": 2, "total_steps": 4}))
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute(OLD_SCHEMA)
    db.executemany(
        "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, NULL, NULL, 0, NULL, ?, ?, ?, NULL)",
        [
            ("old-done", "training", "a", "completed", str(runs / "old-done"), 1.0, 1.0, 2.0),
            ("old-stopped", "training", "b", "stopped", str(runs / "old-stopped"), 3.0, 3.0, 4.0),
            ("old-captions", "captioning", "d", "queued", str(runs / "old-captions"), 5.0, None, None),
        ],
    )
    db.commit()
    db.close()

    service = JobService(tmp_path, python=standin)
    try:
        listed = {job.job_id: job for job in service.list()}
        assert {job_id: job.state for job_id, job in listed.items()} == {
            "old-done": "completed",
            "old-stopped": "stopped",
            "old-captions": "running",  # captioning took no device then, and takes none now
        }
        assert listed["old-stopped"].step == 2 and listed["old-done"].devices == []
        assert [row.devices_wanted for row in service.store.all()] == [1, 1, 0]

        config = runs / "old-stopped" / "config.yaml"
        config.write_text(fast_config(shapes, num_processes=4).to_yaml())  # a resume is checked like a start
        with pytest.raises(ServiceError, match="asks for 4 GPUs"):
            service.resume("old-stopped")
        config.write_text(fast_config(shapes, num_processes=2).to_yaml())
        resumed = service.resume("old-stopped")
        assert resumed.state == "running" and len(resumed.device_ids) == 2
        (start,) = wait_for(lambda: starts(resumed.run_dir), "the resumed job started")
        assert start["args"][:4] == ["-m", "training.cli", "--resume", resumed.run_dir]
        assert start["devices"] == resumed.devices
    finally:
        end_all(service)
