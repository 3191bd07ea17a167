"""generate-image and compare-lora-strengths: check a request, then render it inside the call
(the built-in tiny models: seconds) or as a background job in the job table (a real model: a
512 px image takes a minute or more on a CPU, and on a GPU the job waits for a training job to end).

The rendering itself is `training/generation.py`; torch is imported only when an image is made.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field

from server.errors import ServiceError
from server.inspection import model_geometry
from server.lora_tools import lora_path
from training.config import DEFAULT_MODEL
from training.diagnostics.preflight import SMALLEST_REAL_NATIVE  # smaller: a built-in test model, rendered inline

MAX_SIDE = 2048


class LoraStrength(BaseModel):
    lora: str = Field(description="An exported LoRA's name (list-exported-models) or a .safetensors path.")
    strength_model: float = Field(1.0, ge=-2.0, le=2.0, description="UNet weight, as ComfyUI's strength_model.")
    strength_clip: float | None = Field(
        None, ge=-2.0, le=2.0, description="Text-encoder weight, as ComfyUI's strength_clip; default strength_model."
    )


class GenerationPlan(BaseModel):
    request: dict = Field(description="training.generation.GenerationRequest, as the renderer reads it.")
    native_resolution: int
    label: str


def plan_generation(
    workspace: Path,
    *,
    model_name: str | None,
    prompt: str,
    negative_prompt: str,
    loras: list[LoraStrength],
    steps: int,
    guidance: float | None,
    width: int | None,
    height: int | None,
    seed: int,
    count: int,
    strengths: list[float] | None = None,
) -> GenerationPlan:
    """Everything checked before anything is rendered: the model, the LoRA files, the size."""
    from training.generation import GenerationRequest, LoraUse

    if not prompt.strip():
        raise ServiceError("prompt is empty: describe the image, starting with the LoRA's trigger word")
    paths = [lora_path(workspace, item.lora) for item in loras]
    model = model_name or _model_of(paths) or DEFAULT_MODEL
    native, step = model_geometry(model)
    for side, value in (("width", width), ("height", height)):
        if value is not None and (value % step or not step <= value <= MAX_SIDE):
            raise ServiceError(
                f"{side} {value} does not suit {model}: use a multiple of {step} between {step} and {MAX_SIDE} "
                f"(its native size is {native})"
            )
    request = GenerationRequest(
        model_name=model,
        prompt=prompt,
        negative_prompt=negative_prompt,
        loras=[
            LoraUse(path=str(path), strength_model=item.strength_model, strength_clip=item.strength_clip)
            for path, item in zip(paths, loras)
        ],
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        seed=seed,
        count=count,
        strengths=strengths,
    )
    label = paths[0].stem if paths else "base"
    return GenerationPlan(request=request.model_dump(), native_resolution=native, label=label[:60])


def runs_in_background(plan: GenerationPlan, background: bool | None) -> bool:
    if background is not None:
        return background
    return plan.native_resolution >= SMALLEST_REAL_NATIVE


def render_now(workspace: Path, plan: GenerationPlan) -> list[Path]:
    """Render inside the call, into <workspace>/generations/<time>-<label>/samples/."""
    from training.generation import GenerationRequest, generate

    out_dir = workspace / "generations" / f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}-{plan.label}"
    try:
        return generate(GenerationRequest(**plan.request), out_dir)
    except Exception as exc:  # e.g. a LoRA file for another architecture, or out of GPU memory
        raise ServiceError(f"could not generate: {type(exc).__name__}: {exc}") from None


def request_json(plan: GenerationPlan) -> str:
    return json.dumps(plan.request)


def _model_of(paths: list[Path]) -> str | None:
    """The base model the first LoRA was trained on, as its metadata records it."""
    from server.safetensors_file import InvalidSafetensors, safetensors_metadata

    for path in paths[:1]:
        try:
            training = json.loads(safetensors_metadata(path).get("training_config", "{}"))
        except (InvalidSafetensors, json.JSONDecodeError):
            return None
        return training.get("model_name")
    return None
