"""log_with (training/run_loggers.py): a tiny run logged to TensorBoard and to W&B in offline mode, read back
with TensorBoard's own reader and from the transaction log W&B writes; a logger whose package is missing is
refused with the command that installs it, by a Python that really lacks the package."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import fast_config, step_rows
from PIL import Image

from server.configs import ConfigService
from training.data.synthetic import make_shape_dataset
from training.run_files import smoothed
from training.workspace import read_jsonl

REPO = Path(__file__).resolve().parent.parent
STEPS = 3
LOGGED = {
    "steps": STEPS,
    "validation_split": 0.25,  # one held-out image: validation losses at steps 0 and 3
    "disable_sampling": False,
    "sample_every": STEPS,
    "sample_steps": 2,
    "test_prompts": ["xyz_shape a red circle"],
    "log_with": ["tensorboard", "wandb"],
}
SCALARS = ("loss/train", "loss/smoothed", "loss/validation", "learning_rate", "grad_norm")
SAMPLE_TAGS = ("samples/prompt_0", "samples/control")  # the control prompt: "a red circle"


def train(config_file: Path, run: Path, env: dict[str, str], python: list[str]) -> subprocess.CompletedProcess:
    """`lora-train` as the server starts it: a process of its own."""
    command = [*python, "-m", "training.cli", str(config_file), "--run-dir", str(run), "--quiet"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, tiny_sd15) -> Path:
    """One run for the module (64 px, 3 steps, a held-out image, samples at steps 0 and 3) logged to both, W&B
    offline with its settings and caches in the test's folder."""
    folder = tmp_path_factory.mktemp("logged")
    make_shape_dataset(folder / "shapes", 4, trigger_word="xyz_shape")
    config_file = folder / "logged.yaml"
    config_file.write_text(fast_config(folder / "shapes", name="logged", **LOGGED).to_yaml())
    wandb_dirs = {f"WANDB_{kind}_DIR": str(folder / f"wandb-{kind.lower()}") for kind in ("CONFIG", "CACHE", "DATA")}
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **wandb_dirs}
    done = train(config_file, folder / "run", env, [sys.executable])
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "run"


def test_tensorboard_event_files_read_back_with_tensorboard(logged_run):
    from tensorboard.backend.event_processing import event_accumulator as reader

    everything = {reader.SCALARS: 0, reader.IMAGES: 0}  # 0: keep every event, not a sample of them
    events = reader.EventAccumulator(str(logged_run / "tensorboard"), size_guidance=everything)
    events.Reload()
    assert set(SCALARS) <= set(events.Tags()["scalars"]) and set(events.Tags()["images"]) == set(SAMPLE_TAGS)

    def series(tag: str) -> tuple[list[int], list[float]]:
        return [e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)]

    rows = step_rows(logged_run)
    losses = [row["loss"] for row in rows]
    for tag, expected in [("loss/train", losses), ("learning_rate", [r["lr"] for r in rows]),
                          ("grad_norm", [r["grad_norm"] for r in rows])]:  # fmt: skip
        steps, values = series(tag)
        assert steps == [1, 2, 3], tag  # one value per step
        assert values == pytest.approx(expected, rel=1e-6), tag  # TensorBoard keeps float32
    ema = [None]
    for loss in losses:
        ema.append(smoothed(ema[-1], loss))
    assert series("loss/smoothed") == ([1, 2, 3], pytest.approx(ema[1:], rel=1e-6))
    status = json.loads((logged_run / "status.json").read_text())
    assert series("loss/smoothed")[1][-1] == pytest.approx(status["loss"], rel=1e-6)  # the status's loss
    validation = [row for row in read_jsonl(logged_run / "metrics.jsonl") if row.get("kind") == "validation"]
    assert series("loss/validation") == ([0, 3], pytest.approx([row["loss"] for row in validation], rel=1e-6))

    samples = {(row["step"], row["control"]): row["file"] for row in read_jsonl(logged_run / "samples" / "index.jsonl")}
    for tag in SAMPLE_TAGS:
        images = events.Images(tag)
        assert [image.step for image in images] == [0, STEPS]
        for image in images:
            decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
            file = logged_run / "samples" / samples[image.step, tag == "samples/control"]
            assert decoded.shape == (64, 64, 3) and np.array_equal(decoded, np.asarray(Image.open(file).convert("RGB")))


def transaction_log(path: Path) -> Iterator[bytes]:
    """The records of a W&B transaction log (run-<id>.wandb), as wandb's own reader (the former
    wandb/sdk/internal/datastore.py) reads them: a 7-byte header (':W&B', magic 0xBEE1, version), then LevelDB's
    log format in 32 KiB blocks: chunks of a 7-byte header (CRC-32 of type and data, length, type: full, first,
    middle, last) and data; a block's tail shorter than a header is padding."""
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    block, offset, pending = 32768, 7, b""
    while offset + 7 <= len(data):
        if block - offset % block < 7:
            offset += block - offset % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        chunk = data[offset + 7 : offset + 7 + length]
        if kind == 0 and length == 0:  # the unwritten rest of a log whose writer stopped mid-block
            break
        assert zlib.crc32(bytes([kind]) + chunk) == checksum and len(chunk) == length
        offset += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending


def test_wandb_offline_run_holds_the_history(logged_run):
    from wandb.proto import wandb_internal_pb2 as pb

    [log_file] = logged_run.glob("wandb/offline-run-*/run-*.wandb")
    records = []
    for data in transaction_log(log_file):
        record = pb.Record()
        record.ParseFromString(data)
        records.append(record)
    [run] = [record.run for record in records if record.HasField("run")][:1]
    assert (run.project, run.display_name) == ("logged", logged_run.name)

    history: dict[int, dict] = {}  # step -> {key: value}; an image's fields come as nested keys [key, field]
    for record in records:
        if record.HasField("history"):
            row = history.setdefault(record.history.step.num, {})
            for item in record.history.item:
                [key, *field] = [item.key] if item.key else list(item.nested_key)
                value = json.loads(item.value_json)
                if field:
                    row.setdefault(key, {})[field[0]] = value
                else:
                    row[key] = value
    losses = {row["step"]: row["loss"] for row in step_rows(logged_run)}
    assert {step: row["loss/train"] for step, row in history.items() if "loss/train" in row} == pytest.approx(losses)
    assert sorted(history) == [0, 1, 2, 3] and all(history[step]["_step"] == step for step in history)
    assert [step for step, row in sorted(history.items()) if "loss/validation" in row] == [0, STEPS]
    samples = {(row["step"], row["control"]): row for row in read_jsonl(logged_run / "samples" / "index.jsonl")}
    for step in (0, STEPS):
        for tag in SAMPLE_TAGS:
            image, sample = history[step][tag], samples[step, tag == "samples/control"]
            assert image["_type"] == "image-file" and image["caption"] == sample["prompt"]
            logged = Image.open(log_file.parent / "files" / image["path"]).convert("RGB")
            rendered = Image.open(logged_run / "samples" / sample["file"]).convert("RGB")
            assert np.array_equal(np.asarray(logged), np.asarray(rendered))


def python_without(packages: tuple[str, ...], folder: Path) -> tuple[list[str], dict[str, str]]:
    """A command line and environment for this Python with its packages less `packages`: -S leaves
    site-packages off sys.path, and PYTHONPATH gives back a folder of links to every entry of it but theirs."""
    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith(packages) and entry.suffix != ".pth":
            (folder / entry.name).symlink_to(entry)
    return [sys.executable, "-S"], {**os.environ, "PYTHONPATH": str(folder)}


VALIDATE = """
import json, sys
from pathlib import Path
from server.configs import ConfigService
report = ConfigService(Path(sys.argv[1])).validate(sys.argv[2])
heavy = sorted(name for name in ("torch", "tensorboard", "wandb") if name in sys.modules)
print(json.dumps({"errors": report.errors, "imported": heavy}))
"""


def test_a_missing_logger_is_refused_with_its_install_command(tiny_sd15, tmp_path):
    workspace = tmp_path / "workspace"
    make_shape_dataset(workspace / "datasets" / "shapes", 4, trigger_word="xyz_shape")
    config = fast_config(workspace / "datasets" / "shapes", name="logger-check", **LOGGED)
    ConfigService(workspace).create(config.model_dump(exclude_none=True))
    bare, bare_env = python_without(("tensorboard", "wandb"), tmp_path / "site")
    find = "import importlib.util as u; print(u.find_spec('tensorboard'), u.find_spec('wandb'))"
    found = subprocess.run([*bare, "-c", find], env=bare_env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert found.stdout.split() == ["None", "None"], found.stderr  # really not there

    reports = {}
    for name, (python, env) in {"installed": ([sys.executable], dict(os.environ)), "bare": (bare, bare_env)}.items():
        done = subprocess.run([*python, "-c", VALIDATE, str(workspace), "logger-check"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        reports[name] = json.loads(done.stdout)
    assert reports["installed"] == {"errors": [], "imported": []}  # found, not imported by the server
    assert reports["bare"]["imported"] == []
    for package in ("tensorboard", "wandb"):
        assert any(f'pip install "lora-mcp[{package}]"' in error for error in reports["bare"]["errors"]), package

    # lora-train itself refuses before it loads the model, and logs nothing
    run = tmp_path / "run"
    done = train(workspace / "configs" / "logger-check.yaml", run, bare_env, bare)
    assert done.returncode == 1 and 'pip install "lora-mcp[tensorboard]"' in done.stderr
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == 0 and "lora-mcp[wandb]" in status["error"]
    assert not (run / "tensorboard").exists() and not (run / "wandb").exists()


@pytest.mark.parametrize(("given", "ours"), [("all", ["tensorboard", "wandb"]), ("wandb", ["wandb"])])
def test_kohya_log_with_is_imported(given, ours):
    from training.config_import import import_config

    text = f'pretrained_model_name_or_path = "m"\ntrain_data_dir = "/d"\nlog_with = "{given}"\n'
    result = import_config(text, name="logged", format="kohya")
    assert result.config.log_with == ours and "log_with" not in {item.key for item in result.unmapped}


def wandb_records(run: Path) -> list[list]:
    """The records of each W&B offline run (folder) under `run`, in the order they were started."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for log_file in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        records = []
        for data in transaction_log(log_file):
            record = pb.Record()
            record.ParseFromString(data)
            records.append(record)
        runs.append(records)
    return runs


def test_a_resumed_run_continues_its_wandb_run(tiny_sd15, tmp_path):
    """Stopped after step 2 of 4 (its checkpoint) and resumed with `lora-train --resume`, as resume-training
    does: the second process logs steps 3 and 4 to the W&B run the first one started (the same id), rather
    than to a new one."""
    make_shape_dataset(tmp_path / "shapes", 4, trigger_word="xyz_shape")
    config = fast_config(tmp_path / "shapes", name="resumed", steps=2, save_every=1, log_with=["wandb"])
    (tmp_path / "resumed.yaml").write_text(config.to_yaml())
    wandb_dirs = {f"WANDB_{kind}_DIR": str(tmp_path / f"wandb-{kind.lower()}") for kind in ("CONFIG", "CACHE", "DATA")}
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **wandb_dirs}
    run = tmp_path / "run"
    first = train(tmp_path / "resumed.yaml", run, env, [sys.executable])
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = (run / "wandb-run-id").read_text()
    # Two more steps from the checkpoint at step 2, as a resumed run whose config asks for more.
    resolved = run / "config.yaml"
    resolved.write_text(resolved.read_text().replace("steps: 2\n", "steps: 4\n"))
    command = [sys.executable, "-m", "training.cli", "--resume", str(run), "--quiet"]
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [row["step"] for row in step_rows(run)] == [1, 2, 3, 4]

    assert (run / "wandb-run-id").read_text() == run_id
    runs = wandb_records(run)
    assert len(runs) == 2 and all(folder.name.endswith(f"-{run_id}") for folder in run.glob("wandb/offline-run-*"))
    for records in runs:
        [started] = [record.run for record in records if record.HasField("run")][:1]
        assert started.run_id == run_id and started.project == "resumed"
    logged = [[r.history.step.num for r in records if r.HasField("history")] for records in runs]
    assert logged[0] == [1, 2] and logged[1][-2:] == [3, 4] and min(logged[1]) >= 2  # on from the checkpoint
