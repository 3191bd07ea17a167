"""`lora-train` as a process: signals, kills, exit codes and messages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import fast_config, step_rows
from PIL import Image
from safetensors import safe_open

from training.workspace import atomic_write_text


def lora_train(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "training.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        **kwargs,
    )


def write_config(path: Path, config) -> Path:
    atomic_write_text(path, config.to_yaml())
    return path


def wait_for(predicate, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def metric_steps(run: Path) -> list[int]:
    return [row["step"] for row in step_rows(run)]


def resume_until(run: Path, steps: int) -> None:
    """`lora-train --resume` after setting the run's total steps nearer (the run's config.yaml is
    what a resume reads, so it is edited as a user would). The CLI's own `main`, in this process: the
    signal or kill before it is what needs a process, and a child would import torch again (~6 s of CPU)."""
    from training.cli import main

    resolved = (run / "config.yaml").read_text().replace("steps: 100000", f"steps: {steps}")
    atomic_write_text(run / "config.yaml", resolved)
    assert main(["--resume", str(run), "--quiet"]) == 0, json.loads((run / "status.json").read_text()).get("error")


def test_help_and_argument_errors():
    done = subprocess.run([sys.executable, "-m", "training.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--resume" in done.stdout
    done = subprocess.run([sys.executable, "-m", "training.cli"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "CONFIG or --resume" in done.stderr


def test_invalid_config_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndataset_path: d\nresolution: 30\noptimizer: adam\n")
    done = subprocess.run([sys.executable, "-m", "training.cli", str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "resolution = 30" in lines[0] and "optimizer = 'adam'" in lines[0]


def test_failed_run_exits_1_with_the_reason(tmp_path):
    config = write_config(tmp_path / "c.yaml", fast_config(tmp_path / "missing"))
    done = subprocess.run(
        [sys.executable, "-m", "training.cli", str(config), "--run-dir", str(tmp_path / "run"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("lora-train: failed: dataset")
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"


def test_a_completed_run_prints_the_resolved_run_and_a_second_in_its_directory_is_refused(tmp_path, shapes, tiny_sd15):
    config = write_config(tmp_path / "c.yaml", fast_config(shapes, steps=2))
    done = subprocess.run(
        [sys.executable, "-m", "training.cli", str(config), "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    for expected in ("images: 4", "buckets", "effective", "steps: 2", "trainable parameters"):
        assert expected in done.stderr
    assert done.stdout.strip() == f"done: {tmp_path / 'run' / 'test-run.safetensors'}"

    second = subprocess.run(
        [sys.executable, "-m", "training.cli", str(config), "--run-dir", str(tmp_path / "run"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 2 and "already holds a run" in second.stderr


def test_sigterm_stops_with_a_checkpoint_and_resume_finishes(tmp_path, shapes, tiny_sd15):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", fast_config(shapes, steps=100000, batch_size=1))
    process = lora_train(str(config), "--run-dir", str(run), "--quiet")
    wait_for(lambda: len(metric_steps(run)) >= 3, what="three steps")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "lora-train --resume" in out
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped"
    stopped_at = status["step"]
    assert stopped_at >= 3 and status["last_checkpoint"].endswith(f"step{stopped_at:06d}")
    assert metric_steps(run) == list(range(1, stopped_at + 1))

    resume_until(run, stopped_at + 2)
    assert metric_steps(run) == list(range(1, stopped_at + 3))
    assert json.loads((run / "status.json").read_text())["state"] == "completed"


def test_sigkill_leaves_only_whole_files(tmp_path, shapes, tiny_sd15):
    run = tmp_path / "run"
    config = fast_config(
        shapes,
        steps=100000,
        batch_size=1,
        save_every=1,
        keep_last_n_checkpoints=2,
        disable_sampling=False,
        sample_every=2,
        sample_steps=1,
        test_prompts=["xyz_shape a circle"],
    )
    process = lora_train(str(write_config(tmp_path / "c.yaml", config)), "--run-dir", str(run), "--quiet")
    wait_for(lambda: len(metric_steps(run)) >= 4, what="four steps")
    time.sleep(0.37)  # land somewhere inside a step, a save or a sample
    process.kill()
    process.wait(timeout=60)

    status = json.loads((run / "status.json").read_text())  # parses: never torn
    assert status["state"] == "running"  # the process died without a final state
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    for line in (run / "samples" / "index.jsonl").read_text().splitlines():
        json.loads(line)
    for png in (run / "samples").glob("step*.png"):
        with Image.open(png) as image:
            image.load()
    checkpoints = sorted((run / "checkpoints").glob("step*"))
    assert checkpoints
    for folder in checkpoints:
        torch.load(folder / "training_state.pt", weights_only=True)
        (lora,) = folder.glob("*.safetensors")
        with safe_open(str(lora), "pt") as f:
            assert len(list(f.keys())) > 0

    # The killed run resumes from its newest checkpoint, dropping rows of the lost steps.
    last = int(checkpoints[-1].name.removeprefix("step"))
    resume_until(run, last + 1)
    assert metric_steps(run) == list(range(1, last + 2))
    leftovers = [p.name for p in run.rglob(".*")]
    assert leftovers == [], leftovers


def test_resume_ignores_a_stop_request_left_behind(shapes, tmp_path):
    """A stop request the run never read (it was killed first) must not stop `lora-train --resume` at once."""
    from training.cli import main
    from training.run_files import RunFiles
    from training.trainer import run_training

    run_dir = tmp_path / "run"
    files = RunFiles(run_dir)
    files.create()
    files.request_stop()  # read before step 1: the run stops at step 0 with a checkpoint
    first = run_training(fast_config(shapes, steps=3), run_dir)
    assert first.state == "stopped" and first.step == 0
    files.request_stop()  # left behind, as by a run killed after the server wrote it
    assert main(["--resume", str(run_dir), "--quiet"]) == 0
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    assert [row["step"] for row in step_rows(run_dir)] == [1, 2, 3]
