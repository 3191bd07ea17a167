"""Shared fixtures: one workspace per test session, where each built-in tiny model is built
once; small generated datasets; a fast training config; the trainings the dashboard and App tests watch, each
started once a session (`live_training` on the shared HTTP server, `finished_training` in a workspace of its
own); one headless Chromium (tests/browser.py)."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: tests must never try the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# One thread per process, for these tests and every process they start (before torch reads it): the tiny models'
# operations are too small to gain from a second thread, and on CI's 2 cores the tests' process, a server's
# trainer and its renderer often run side by side, where more threads than cores only wait on each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import closing  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402
from browser import browser, chrome  # noqa: E402, F401 (fixtures: one Chromium for the session)
from http_server import HttpServer, call_tool, csrf_token, events, logged_in, upload_images  # noqa: E402

from training.config import TrainingConfig  # noqa: E402
from training.data.synthetic import make_shape_dataset  # noqa: E402

ENDED = ("completed", "failed", "stopped", "interrupted")


@pytest.fixture(scope="session", autouse=True)
def workspace(tmp_path_factory) -> Path:
    """LORA_MCP_HOME for the whole session, so built-in models are built once and shared."""
    root = tmp_path_factory.mktemp("workspace")
    os.environ["LORA_MCP_HOME"] = str(root)
    return root


@pytest.fixture(scope="session")
def tiny_sd15(workspace) -> Path:
    from training.models.builtin import ensure_builtin

    return ensure_builtin("builtin:tiny-sd15", workspace / "models")


@pytest.fixture(scope="session")
def tiny_sd2v(workspace) -> Path:
    from training.models.builtin import ensure_builtin

    return ensure_builtin("builtin:tiny-sd2-v", workspace / "models")


@pytest.fixture(scope="session")
def tiny_sdxl(workspace) -> Path:
    from training.models.builtin import ensure_builtin

    return ensure_builtin("builtin:tiny-sdxl", workspace / "models")


@pytest.fixture(scope="session")
def tiny_git(tmp_path_factory) -> Path:
    """A GIT image-to-text model at toy size with random weights: its captions are nonsense,
    the plumbing (processor, generate, decode) is the real one."""
    import torch
    from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    folder = tmp_path_factory.mktemp("tiny-git")
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *["a", "the", "red", "blue", "cat", "dog", "on", "in", "photo", "of", "with"],
    ]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    processor = GitProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=BertTokenizer(str(folder / "vocab.txt")),
    )
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=16
    )
    config = GitConfig(
        vision_config=vision,
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model_folder = folder / "model"
    GitForCausalLM(config).save_pretrained(model_folder)
    processor.save_pretrained(model_folder)
    return model_folder


@pytest.fixture(scope="session")
def http_server(tmp_path_factory, tiny_sd15):
    """One `lora-mcp http` process (token auth, loopback, free port) shared by the HTTP tests: see
    tests/http_server.py for what it offers (url, token, headers, workspace)."""
    from http_server import start_http_server

    server = start_http_server(tmp_path_factory.mktemp("http-workspace"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def open_http_server(tmp_path_factory, tiny_sd15):
    """`lora-mcp http --no-auth` on loopback: how the guide's HTTP samples run."""
    from http_server import start_http_server

    server = start_http_server(tmp_path_factory.mktemp("open-http-workspace"), "--no-auth")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def lora_bytes(tmp_path_factory) -> bytes:
    """A real safetensors LoRA of about 300 KB: 5 chunks of 64 KiB (the last one short), or 2 of the guide's
    256 KiB. Its own metadata names a trigger phrase (file_phrase) and a base model (sd15)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "lora_unet_mid.lora_down.weight": torch.randn(64, 512, generator=generator),
        "lora_unet_mid.lora_up.weight": torch.randn(512, 64, generator=generator),
        "lora_unet_mid.alpha": torch.tensor(8.0),
        "lora_te_extra.lora_down.weight": torch.randn(64, 150, generator=generator).half(),
    }
    path = tmp_path_factory.mktemp("lora") / "made.safetensors"
    save_file(tensors, str(path), metadata={"modelspec.trigger_phrase": "file_phrase", "ss_sd_model_name": "sd15"})
    data = path.read_bytes()
    assert 4 * 65536 < len(data) < 5 * 65536
    return data


@pytest.fixture
def shapes(tmp_path) -> Path:
    """Four 64 px images with captions that start with the trigger word xyz_shape."""
    folder = tmp_path / "shapes"
    make_shape_dataset(folder, 4, trigger_word="xyz_shape")
    return folder


def fast_config(dataset: Path, **overrides) -> TrainingConfig:
    """A config that trains the tiny SD 1.x model for a few steps at 64 px, without samples."""
    values = dict(
        name="test-run",
        model_name="builtin:tiny-sd15",
        dataset_path=str(dataset),
        resolution=64,
        steps=4,
        batch_size=2,
        rank=4,
        learning_rate=1e-3,
        trigger_word="xyz_shape",
        disable_sampling=True,
        save_every=1000,
    )
    values.update(overrides)
    return TrainingConfig.from_dict(values)


def step_rows(run: Path) -> list[dict]:
    """The optimizer-step rows of a run's metrics.jsonl (validation and update rows have a `kind`)."""
    import json

    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [row for line in path.read_text().splitlines() if "kind" not in (row := json.loads(line))]


def tiny_pipeline(folder: Path, pipeline_class=None):
    """A quiet diffusers pipeline of a built-in tiny model folder: StableDiffusionPipeline without
    safety checker by default, or `pipeline_class` (StableDiffusionXLPipeline, FluxPipeline)."""
    from diffusers import StableDiffusionPipeline

    if pipeline_class is None:
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    else:
        pipe = pipeline_class.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wait_until(service, job_id: str, predicate: Callable, timeout: float = 240.0):
    """The job's status once `predicate(status)` holds, polled through `service` (a JobService); a deadline, not a
    timing: past it the test fails with the status it was left at."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = service.status(job_id)
        if predicate(status):
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never got there: {service.status(job_id)}")


# --- the trainings the dashboard and the App watch ----------------------------------------------------------
@dataclass
class LiveTraining:
    """A training on the shared `http_server` that runs until stopped (10,000 steps of the tiny model at 64 px,
    sampled every 10 steps with a test prompt): the tests that stop it (from the dashboard, the page, the App) call
    `running()` first, which resumes it through the dashboard when an earlier test stopped it."""

    server: HttpServer
    job_id: str
    config_name: str
    dataset: str  # the uploaded dataset's name: four captioned shapes
    trigger: str

    def state(self) -> str:
        return call_tool(self.server, "get-training-status", job_id=self.job_id)["state"]

    def running(self) -> None:
        """Return once the job runs; a stopped job is first resumed as the page's resume button does (the action
        with the page's CSRF token), and its return to queued, then running, is read from the event stream."""
        if self.state() == "running":
            return
        client = logged_in(self.server)
        with closing(client), client.stream("GET", "/dashboard/events", timeout=httpx.Timeout(30, read=300)) as stream:
            state = self.state()  # again, now that the stream is open: no change from here on is missed
            if state == "running":
                return
            if state in ENDED:
                resumed = client.post(f"/dashboard/api/jobs/{self.job_id}/resume",
                                      headers={"X-CSRF-Token": csrf_token(client)})
                assert resumed.status_code == 200, resumed.text
                assert resumed.json()["job_id"] == self.job_id, resumed.json()
                assert resumed.json()["state"] in ("queued", "running"), resumed.json()
            seen = []
            for name, data in events(stream):
                if name == "job" and data["job_id"] == self.job_id:
                    seen.append(data["state"])
                    assert data["state"] in ("queued", "running"), seen
                    if data["state"] == "running":
                        return

    def stop(self) -> None:
        """Stop the job if it runs and wait until it has ended: no trainer is left taking the CPU from other tests."""
        if self.state() in ("queued", "running"):
            call_tool(self.server, "stop-training", job_id=self.job_id)
        deadline = time.monotonic() + 240
        while (state := self.state()) not in ENDED:
            assert time.monotonic() < deadline, f"job {self.job_id} is still {state} after a stop"
            time.sleep(0.2)


@pytest.fixture(scope="session")
def live_training(http_server, tmp_path_factory) -> LiveTraining:
    """The session's long training, started through the JSON API on an uploaded dataset; stopped at the end."""
    trigger, dataset = "xyz_shape", "live-shapes"
    folder = tmp_path_factory.mktemp("live-dataset") / "shapes"
    make_shape_dataset(folder, 4, trigger_word=trigger)
    assert call_tool(http_server, "upload-dataset", dataset_name=dataset, images=upload_images(folder))["saved"] == 4
    config_name = "live-shapes-style"
    call_tool(http_server, "create-training-config", name=config_name, model_name="builtin:tiny-sd15",
              dataset_path=dataset, trigger_word=trigger, resolution=64, steps=10_000, batch_size=1, rank=4,
              test_prompts=[f"{trigger} a red circle"], sample_every=10, sample_steps=2, save_every=100_000)
    job_id = call_tool(http_server, "start-training", config_name=config_name)["job_id"]
    training = LiveTraining(http_server, job_id, config_name, dataset, trigger)
    yield training
    training.stop()


@pytest.fixture(scope="module")
def live(live_training) -> LiveTraining:
    """`live_training` for a module, which leaves it stopped: the trainer runs only while its watchers do."""
    yield live_training
    live_training.stop()


@dataclass
class FinishedTraining:
    workspace: Path  # the tiny models linked, datasets/shapes, one completed job
    job_id: str


@pytest.fixture(scope="session")
def finished_training(tmp_path_factory, tiny_sd15) -> FinishedTraining:
    """A workspace where a real training job of 4 steps completed: samples of one test prompt and of the control
    prompt at steps 0, 2 and 4, a validation loss every 2 steps (step 0: the base model), a checkpoint at step 2.
    Tests only read it (or copy its run folder, as test_evaluate_lora does)."""
    from server.app import open_services

    root = tmp_path_factory.mktemp("finished-ws")
    (root / "models").symlink_to(tiny_sd15.parent)  # the session's built-in models, not built again
    make_shape_dataset(root / "datasets" / "shapes", 4, trigger_word="xyz_shape")
    config = fast_config(
        root / "datasets" / "shapes",
        name="watched",
        disable_sampling=False,
        test_prompts=["xyz_shape a red circle"],
        sample_every=2,
        sample_steps=2,
        validation_split=0.25,
        validation_every=2,
        save_every=2,
    )
    jobs = open_services(root).jobs
    job_id = jobs.start("watched", config.to_yaml()).job_id
    # A deadline, not a timing: a busy 2-core CI machine is slow.
    status = wait_until(jobs, job_id, lambda status: status.state in ENDED, timeout=900)
    assert status.state == "completed", jobs.logs(job_id, 40)
    return FinishedTraining(root, job_id)


@dataclass
class OutOfMemoryRun:
    run_dir: Path  # also holds request.yaml, as a job's run folder does
    result: object  # training.trainer.RunResult


@pytest.fixture(scope="session")
def oom_run(tmp_path_factory, tiny_sd15) -> OutOfMemoryRun:
    """A run of 8 steps (save_every 2) whose device ran out of memory in the forward pass of step 4, injected by a
    trainer subclass (this machine has no GPU to fill), as a batch of larger images would: it saved checkpoint
    step000003 and failed. Tests only read it; test_resume_fix copies its folder before resuming it."""
    import torch

    from training.trainer import Trainer, run_training

    class OutOfMemoryAt(Trainer):
        def _loss(self, batch):
            if self.step == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            return super()._loss(batch)

    root = tmp_path_factory.mktemp("oom")
    make_shape_dataset(root / "shapes", 4, trigger_word="xyz_shape")
    config = fast_config(root / "shapes", name="oom", steps=8, save_every=2)
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "request.yaml").write_text(config.to_yaml())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("training.trainer.Trainer", OutOfMemoryAt)  # run_training builds its trainer by this name
        result = run_training(config, run_dir)
    return OutOfMemoryRun(run_dir, result)
