"""Data-parallel training through Accelerate's launcher (issue 14, part 1), on CPU with gloo over loopback:
real `lora-train` processes, 2 workers x 1 thread. The 2-process runs are shared between tests (module
fixtures), since each pays the start-up of three Python processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import fast_config, step_rows
from safetensors.torch import load_file

from training.cli import main as lora_train_main
from training.data.buckets import BucketBatches
from training.distributed import Distributed, PeerLost
from training.run_files import RunFiles
from training.launch import root_cause
from training.processes import detached_options, interrupt_group
from training.trainer import run_training

STEPS = 20
# 4 images, 1 held out: 3 samples a epoch, global batches of 2 and 1, so the second process's slice of every
# other batch is empty (it joins the all-reduce with zero gradients); the held-out image is scored by one process.
OPTIONS = dict(
    steps=STEPS, batch_size=1, save_every=2, validation_split=0.25, validation_every=5, flip_aug=True, noise_offset=0.1
)
TIMEOUT_S = 300
# LoRA weights of runs that differ only in float summation order (a sum of two half-batches, then all-reduced):
# Adam scales each step to about lr (1e-3) whatever the gradient, so near-zero gradients (cross-attention keys
# of a fixed caption) carry that order's noise into the weights: after 20 steps up to 2.2e-5 (one thread per
# process; 1.2e-5 with two), on the mid block's cross-attention output, on values of ~1e-2. Batches split the wrong
# way differ by the size of the values themselves, 50x this bound.
ATOL = 1e-4


def lora_train(*args: str, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "training.cli", "--quiet", *args]
    if not wait:  # as the server starts it: in a process group of its own
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return subprocess.Popen(command, env=env, **pipes, **detached_options())
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def write_config(folder: Path, dataset: Path, **overrides) -> Path:
    path = folder / f"config-{len(list(folder.glob('config-*')))}.yaml"
    path.write_text(fast_config(dataset, **{**OPTIONS, **overrides}).to_yaml())
    return path


def validation_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row.get("kind") == "validation"]


def status_of(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def lora_of(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "test-run.safetensors"))


def wait_for(predicate, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def has_checkpoint(run: Path) -> bool:
    return status_has(run, "last_checkpoint")


def status_has(run: Path, key: str) -> bool:
    try:
        return status_of(run).get(key) is not None
    except (OSError, ValueError):  # not written yet, or (Windows) being replaced
        return False


def start_machines(folder: Path, config: Path | None = None) -> list[subprocess.Popen]:
    """Two `lora-train` launchers on this host as machines 0 and 1 of a new run of `config` (or resuming),
    with run directories folder/m0 and folder/m1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    address = ["--main-process-ip", "127.0.0.1", "--main-process-port", port]
    runs = [folder / f"m{rank}" for rank in (0, 1)]
    run_args = [[str(config), "--run-dir", str(run)] if config else ["--resume", str(run)] for run in runs]
    return [lora_train(*args, "--machine-rank", str(rank), *address, wait=False) for rank, args in enumerate(run_args)]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from training.data.synthetic import make_shape_dataset

    folder = tmp_path_factory.mktemp("dp-data") / "shapes"
    make_shape_dataset(folder, 4, trigger_word="xyz_shape")
    return folder


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, dataset, tiny_sd15) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted run of 2 processes x batch 1."""
    folder = tmp_path_factory.mktemp("dp-two")
    done = lora_train(str(write_config(folder, dataset, num_processes=2)), "--run-dir", str(folder / "run"))
    assert done.returncode == 0, done.stderr
    return folder / "run", done


@pytest.fixture(scope="module")
def two_machine_run(tmp_path_factory, dataset, tiny_sd15) -> Path:
    """An uninterrupted run of 2 machines x 1 process on this host; machine 0's run directory."""
    folder = tmp_path_factory.mktemp("dp-machines")
    for machine in start_machines(folder, write_config(folder, dataset, num_machines=2)):
        assert machine.wait(TIMEOUT_S) == 0, machine.stderr.read()
    return folder / "m0"


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, dataset, two_process_run):
    run, done = two_process_run
    single = run_training(fast_config(dataset, **{**OPTIONS, "batch_size": 2}), tmp_path / "single")
    assert single.state == "completed"

    two, one = lora_of(run), lora_of(tmp_path / "single")
    assert sorted(two) == sorted(one)
    for key in two:
        assert torch.allclose(two[key], one[key], rtol=0, atol=ATOL), key
    assert any(key.endswith("lora_up.weight") and two[key].abs().max() > 1e-4 for key in two), "the LoRA never moved"
    losses = [row["loss"] for row in step_rows(run)]
    assert len(losses) == STEPS  # one writer: the main process
    assert losses == pytest.approx([row["loss"] for row in step_rows(tmp_path / "single")], rel=1e-5)
    assert validation_losses(run) == pytest.approx(validation_losses(tmp_path / "single"), rel=1e-5)

    status = status_of(run)
    assert status["state"] == "completed" and status["step"] == STEPS
    assert [p["rank"] for p in status["processes"]] == [0, 1]
    assert len({p["pid"] for p in status["processes"]}) == 2 and status["processes"][0]["device"] == "cpu"
    assert f"done: {run / 'test-run.safetensors'}" in done.stdout
    assert (run / "train.log").read_text().count(f"step {STEPS}/{STEPS}") == 1
    assert "x 2 processes = 2 effective" in (run / "train.log").read_text()


def test_a_stopped_two_process_run_resumes_exactly(tmp_path, dataset, two_process_run):
    run = tmp_path / "run"
    wrapper = lora_train(str(write_config(tmp_path, dataset, num_processes=2)), "--run-dir", str(run), wait=False)
    wait_for(lambda: has_checkpoint(run))
    RunFiles(run).request_stop()  # what the server's stop-training does: the file, then SIGTERM to the group,
    interrupt_group(wrapper.pid)  # which the wrapper ignores while the workers finish their step and save
    assert wrapper.wait(TIMEOUT_S) == 130, wrapper.stderr.read()
    stopped = status_of(run)
    assert stopped["state"] == "stopped" and 2 <= stopped["step"] < STEPS
    state = torch.load(Path(stopped["last_checkpoint"]) / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2

    resumed = lora_train("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    straight = two_process_run[0]
    assert [r["loss"] for r in step_rows(run)] == [r["loss"] for r in step_rows(straight)]
    for key, value in lora_of(straight).items():
        assert torch.equal(lora_of(run)[key], value), key


def test_a_killed_process_fails_the_run_cleanly_and_it_resumes(tmp_path, dataset, two_process_run):
    run = tmp_path / "run"
    wrapper = lora_train(str(write_config(tmp_path, dataset, num_processes=2)), "--run-dir", str(run), wait=False)
    wait_for(lambda: has_checkpoint(run))
    processes = status_of(run)["processes"]
    seen = {wrapper.pid, *(p.pid for p in psutil.Process(wrapper.pid).children(recursive=True))}
    victim = processes[1]["pid"]
    os.kill(victim, signal.SIGKILL)

    assert wrapper.wait(TIMEOUT_S) == 1
    failed = status_of(run)
    assert failed["state"] == "failed" and failed["failed_rank"] == 1
    assert f"process 1 (pid {victim}" in failed["error"] and "SIGKILL" in failed["error"]
    assert f"lora-train --resume {run}" in failed["error"]  # what to do next
    wait_for(lambda: all(gone(pid) for pid in seen | {p["pid"] for p in processes}), timeout=60)

    resumed = lora_train("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert status_of(run)["state"] == "completed"
    for key, value in lora_of(two_process_run[0]).items():  # it went on from the checkpoint, exactly
        assert torch.equal(lora_of(run)[key], value), key


def test_a_signal_to_one_worker_stops_every_process_after_the_same_step(tmp_path, dataset):
    run = tmp_path / "run"
    wrapper = lora_train(str(write_config(tmp_path, dataset, num_processes=2)), "--run-dir", str(run), wait=False)
    wait_for(lambda: has_checkpoint(run))
    os.kill(status_of(run)["processes"][1]["pid"], signal.SIGTERM)  # rank 1's wish, agreed after its step
    assert wrapper.wait(TIMEOUT_S) == 130, wrapper.stderr.read()
    stopped = status_of(run)
    assert stopped["state"] == "stopped" and stopped["step"] < STEPS
    state = torch.load(Path(stopped["last_checkpoint"]) / "training_state.pt", weights_only=True)
    assert state["step"] == stopped["step"]  # both processes stopped after it, and the main one saved it


def test_a_killed_wrapper_takes_its_workers_with_it(tmp_path, dataset):
    run = tmp_path / "run"
    long = write_config(tmp_path, dataset, num_processes=2, steps=100_000, save_every=1000)  # runs until killed
    wrapper = lora_train(str(long), "--run-dir", str(run), wait=False)
    wait_for(lambda: status_has(run, "processes"))
    seen = {p.pid for p in psutil.Process(wrapper.pid).children(recursive=True)}
    seen |= {p["pid"] for p in status_of(run)["processes"]}
    assert len(seen) >= 3  # the launcher and its 2 workers
    os.kill(wrapper.pid, signal.SIGKILL)  # the wrapper alone: its launcher runs in a session of its own
    wrapper.wait(TIMEOUT_S)
    wait_for(lambda: all(gone(pid) for pid in seen), timeout=60)


def test_two_machines_stopped_from_machine_1_resume_exactly(tmp_path, dataset, two_machine_run):
    machines = start_machines(tmp_path, write_config(tmp_path, dataset, num_machines=2))
    wait_for(lambda: has_checkpoint(tmp_path / "m0"))
    RunFiles(tmp_path / "m1").request_stop()  # a Ctrl-C on machine 1 writes it there
    for machine in machines:
        machine.wait(TIMEOUT_S)
    stopped = status_of(tmp_path / "m0")
    assert stopped["state"] == "stopped" and 2 <= stopped["step"] < STEPS
    assert not RunFiles(tmp_path / "m1").stop_requested()  # honoured: the resumed run starts clean
    assert not list((tmp_path / "m1").glob("checkpoints/*"))  # machine 1 resumes from machine 0's checkpoint

    for machine in start_machines(tmp_path):
        assert machine.wait(TIMEOUT_S) == 0, machine.stderr.read()
    straight = two_machine_run
    assert [r["loss"] for r in step_rows(tmp_path / "m0")] == [r["loss"] for r in step_rows(straight)]
    for key, value in lora_of(straight).items():
        assert torch.equal(lora_of(tmp_path / "m0")[key], value), key


def test_two_machines_on_one_host_train_one_job(two_process_run, two_machine_run):
    assert status_of(two_machine_run)["state"] == "completed"
    assert not (two_machine_run.parent / "m1" / "test-run.safetensors").exists()
    assert not (two_machine_run.parent / "m1" / "status.json").exists()
    for key, value in lora_of(two_process_run[0]).items():  # the same world of 2 as on one machine
        assert torch.allclose(lora_of(two_machine_run)[key], value, rtol=0, atol=ATOL), key


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharded_batches_cover_every_sample_once_per_epoch(world_size):
    buckets = [(64, 64)] * 7 + [(64, 32)] * 5  # two buckets: last batches smaller than the global batch
    batch_size = 2
    batches = BucketBatches(buckets, batch_size * world_size, seed=3)
    assert batches.epoch(0) == BucketBatches(buckets, batch_size * world_size, seed=3).epoch(0)
    assert batches.epoch(0) != BucketBatches(buckets, batch_size * world_size, seed=4).epoch(0)
    seen = []
    for batch in batches.epoch(0):
        slices = [Distributed(rank, world_size).shard(len(batch)) for rank in range(world_size)]
        assert slices[0][0] == 0 and slices[-1][1] == len(batch)
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))  # disjoint and contiguous
        assert all(end - start <= batch_size for start, end in slices)
        seen += [batch[i] for start, end in slices for i in range(start, end)]
    assert sorted(seen) == list(range(len(buckets)))


def test_each_process_gets_its_slice_of_the_single_process_batch(tmp_path, dataset, tiny_sd15):
    """Two TrainingData of ranks 0 and 1 with batch 1 give, step by step, the halves of one process's batch of
    2: the same images, flips and latents."""
    from training.data.dataset import scan_dataset
    from training.data.loader import TrainingData
    from training.models.loading import load_base_model
    from training.models.source import resolve_model

    base = load_base_model(resolve_model("builtin:tiny-sd15"), torch.device("cpu"))
    records = scan_dataset(dataset, trigger_word="xyz_shape", trigger_words={}).images[:3]
    resolved = {"native_resolution": 64, "num_images": len(records)}
    one = TrainingData(records, base, fast_config(dataset, flip_aug=True).resolve(**resolved), tmp_path / "one")
    halves = fast_config(dataset, flip_aug=True, batch_size=1).resolve(**resolved)
    ranks = [TrainingData(records, base, halves, tmp_path / f"r{rank}", dist=Distributed(rank, 2)) for rank in (0, 1)]
    for data in (one, *ranks):
        data.cache_latents()
    for _ in range(4):  # two epochs of a batch of 2 and a batch of 1
        whole, parts = one.next_batch(), [data.next_batch() for data in ranks]
        assert all(part.files == whole.files and part.global_size == len(whole.files) for part in parts)
        assert [part.first for part in parts] == [0, len(whole.files) // 2]
        assert torch.equal(torch.cat([part.latents for part in parts]), whole.latents)


LOOPBACK = ["--main-process-ip", "127.0.0.1", "--main-process-port"]


@pytest.mark.parametrize(
    ("config", "flags", "message"),
    [
        ({"num_machines": 2}, [], "--main-process-ip and --main-process-port"),
        ({"num_machines": 2}, ["--machine-rank", "2", *LOOPBACK, "29500"], "--machine-rank 2"),
        ({}, ["--machine-rank", "1"], "--machine-rank 1"),
        ({"num_machines": 2}, [*LOOPBACK, "70000"], "1 to 65535"),
    ],
)
def test_machine_flags_are_checked(tmp_path, dataset, capsys, config, flags, message):
    code = lora_train_main([str(write_config(tmp_path, dataset, **config)), "--run-dir", str(tmp_path / "r"), *flags])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_lost_peer_in_a_barrier_is_not_this_process_failure():
    class GoneAccelerator:  # what Accelerate's wait_for_everyone raises when gloo finds a peer gone
        def wait_for_everyone(self):
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")

    with pytest.raises(PeerLost, match="process 1 lost its peers"):
        Distributed(1, 2, 1, GoneAccelerator()).barrier()


def test_one_process_sums_nothing_and_keeps_its_own_stop_wish():
    parameter = torch.nn.Parameter(torch.ones(3))
    parameter.grad = torch.full((3,), 2.0)
    for stop in (False, True):  # no process group exists here: a collective would raise
        assert Distributed.single().sum_gradients([parameter], torch.tensor(0.5), stop) == (0.5, stop)
    assert torch.equal(parameter.grad, torch.full((3,), 2.0))


def test_the_cause_of_a_failure_is_the_process_that_failed_first():
    agent_stopped = dict(rank=0, pid=10, host="h", exitcode=-15, signal="SIGTERM", recorded=False, timestamp=5)
    killed = {**agent_stopped, "rank": 1, "exitcode": -9, "signal": "SIGKILL", "timestamp": 5}
    raised = {**agent_stopped, "rank": 2, "exitcode": 1, "signal": None, "recorded": True, "timestamp": 6}
    assert root_cause([agent_stopped, killed]) == killed
    assert root_cause([agent_stopped, killed, raised]) == raised
    assert root_cause([agent_stopped]) == agent_stopped and root_cause([]) is None


def test_a_two_process_job_started_by_the_server_gets_two_devices_and_shows_both_processes(
    tmp_path, dataset, tiny_sd15, monkeypatch
):
    from server.jobs import JobService

    monkeypatch.setenv("LORA_MCP_GPUS", "0,1")  # pretend: the child gets CUDA_VISIBLE_DEVICES=0,1, harmless on CPU
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "models").symlink_to(tiny_sd15.parent)
    service = JobService(tmp_path)
    job = service.start("dp", fast_config(dataset, **{**OPTIONS, "num_processes": 2}).to_yaml())
    assert service.store.get(job.job_id).device_ids == ["0", "1"]
    wait_for(lambda: service.status(job.job_id).processes or service.status(job.job_id).state != "running")
    running = service.status(job.job_id)  # shown while it runs: 20 steps of 2 processes take seconds
    assert running.devices == ["0", "1"]
    assert sorted(p.rank for p in running.processes) == [0, 1]
    assert len({p.pid for p in running.processes}) == 2
    wait_for(lambda: service.status(job.job_id).state not in ("queued", "running"))
    status = service.status(job.job_id)
    assert status.state == "completed", status.error
    assert service.store.get(job.job_id).device_ids == []  # given back at the end
