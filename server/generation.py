"""generate-image and compare-lora-strengths: check a request, then render it inside the call
(the built-in tiny models: seconds) or as a background job in the job table (a real model: a
512 px image takes a minute or more on a CPU, and on a GPU the job waits for a training job to end).

The rendering itself is `training/generation.py`, always in a child process (`python -m
training.generation`): the server never imports torch.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from server.errors import ServiceError
from server.inspection import model_geometry
from server.lora_tools import lora_path
from training.config_inputs import DEFAULT_MODEL
from training.generation import GenerationRequest
from training.guide import SMALLEST_REAL_NATIVE  # smaller: a built-in test model, rendered inline
from training.jobs.store import JobRecord
from training.request_child import NO_CONSOLE_WINDOW
from training.run_files import RUN_KEY, RunFiles, trained_base_model

MAX_SIDE = 2048


class GenerationPlan(BaseModel):
    request: GenerationRequest  # resolved: its model_name set, its LoRAs named by their paths
    native_resolution: int
    label: str


def plan_generation(workspace: Path, request: GenerationRequest) -> GenerationPlan:
    """Everything checked before anything is rendered: the model, the LoRA files, the size."""
    if not request.prompt.strip():
        raise ServiceError("prompt is empty: describe the image, starting with the LoRA's trigger word")
    paths = [lora_path(workspace, item.lora) for item in request.loras]
    recorded = None if request.model_name else _model_of(workspace, paths)
    model = request.model_name or recorded or DEFAULT_MODEL
    try:
        native, step = model_geometry(model)
    except ServiceError as exc:
        if recorded is None:
            raise
        raise ServiceError(
            f"{paths[0].name} records {recorded!r} as its base model, which is not here (its run may be deleted): "
            f"give model_name, the base model it was trained on. {exc}"
        ) from None
    for side, value in (("width", request.width), ("height", request.height)):
        if value is not None and (value % step or not step <= value <= MAX_SIDE):
            raise ServiceError(
                f"{side} {value} does not suit {model}: use a multiple of {step} between {step} and {MAX_SIDE} "
                f"(its native size is {native})"
            )
    loras = [item.model_copy(update={"lora": str(path)}) for path, item in zip(paths, request.loras)]
    resolved = request.model_copy(update={"model_name": model, "loras": loras})
    label = paths[0].stem if paths else "base"
    return GenerationPlan(request=resolved, native_resolution=native, label=label[:60])


def runs_in_background(plan: GenerationPlan, background: bool | None) -> bool:
    if background is not None:
        return background
    return plan.native_resolution >= SMALLEST_REAL_NATIVE


def render_or_queue(
    workspace: Path, request: GenerationRequest, background: bool | None, start_job: Callable[[str, str], JobRecord]
) -> tuple[GenerationPlan, list[Path] | JobRecord]:
    """Check the request, then render it inside the call (a built-in tiny model) or queue it as a job
    (a real model, or as `background` says) with `start_job(label, request_json)`: the plan with the
    images written or the job started."""
    plan = plan_generation(workspace, request)
    if runs_in_background(plan, background):
        return plan, start_job(plan.label, plan.request.model_dump_json())
    return plan, render_now(workspace, plan)


def render_now(workspace: Path, plan: GenerationPlan) -> list[Path]:
    """Render inside the call, into <workspace>/generations/<time>-<label>/samples/, by the background
    job's own child (`python -m training.generation`, waited for): rendering imports torch and diffusers,
    which the server never does."""
    out_dir = workspace / "generations" / f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}-{plan.label}"
    files = RunFiles(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / "request.json").write_text(plan.request.model_dump_json(), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "training.generation", str(out_dir)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        creationflags=NO_CONSOLE_WINDOW,
    )
    status = json.loads(files.status.read_text(encoding="utf-8")) if files.status.is_file() else {}
    if done.returncode != 0 or status.get("state") != "completed":
        # e.g. a LoRA file for another architecture, or out of GPU memory: the job's "<Type>: message"
        crash = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        raise ServiceError(f"could not generate: {status.get('error') or crash[0]}")
    return [files.samples / name for name in status["latest_samples"]]


def _model_of(workspace: Path, paths: list[Path]) -> str | None:
    """The base model the first LoRA was trained on, as its metadata (and this workspace's run) records it."""
    from server.safetensors_file import InvalidSafetensors, safetensors_metadata

    for path in paths[:1]:
        try:
            metadata = safetensors_metadata(path)
            recorded = json.loads(metadata.get("training_config", "{}")).get("model_name")
        except (InvalidSafetensors, json.JSONDecodeError, AttributeError):
            return None
        # a local model is recorded by its folder's name only: its run's config has the path
        return recorded and trained_base_model(recorded, metadata.get(RUN_KEY), workspace / "runs")
    return None
