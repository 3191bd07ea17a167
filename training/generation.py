"""Images from a base model with a stack of LoRAs at chosen strengths: generate-image, and
compare-lora-strengths (one LoRA across strengths with a fixed seed, as one labelled grid).

LoRAs are loaded with diffusers (`load_lora_weights`, kohya or diffusers layout) as named
adapters and weighted per component with `set_adapters`: `strength_model` scales the UNet's
(FLUX: the transformer's) part and `strength_clip` the text encoder's, as ComfyUI's LoraLoader
does. A LoRA at strength 0 adds exactly nothing, so a stack with one at 0 gives the image of the
stack without it.

A long request runs as a background job: `python -m training.generation RUN_DIR` reads
`request.json` and writes its images like a run's samples (`samples/*.png` and
`samples/index.jsonl`, which get-training-samples reads) with status.json counting images.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, BaseModel, Field, model_validator

from training.families import default_guidances

log = logging.getLogger("training.generation")
GRID_LABEL_HEIGHT = 20  # px of caption strip under each image of a strength grid
MAX_STRENGTH = 2.0  # |strength| past 1 exaggerates a LoRA; past 2 it only breaks the image
DEFAULT_COMPARED_STRENGTHS = [0.0, 0.4, 0.7, 1.0]


def check_strengths(strengths: list[float] | None) -> None:
    """A model-level check, not a field bound: the strengths' schema stays a plain number list, and the
    message names the whole list, as the assistant gave it."""
    if strengths and any(not -MAX_STRENGTH <= strength <= MAX_STRENGTH for strength in strengths):
        raise ValueError(f"strengths {strengths} must lie between -2 and 2 (usually 0 to 1)")


Steps = Annotated[int, Field(ge=1, le=150)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
DEFAULT_STEPS = 20


# The tool names a LoRA by an exported name or a path (`lora`); the server resolves that to the file's path
# before rendering, which the renderer's callers may call `path`. (No docstring: clients would read it as
# the schema's description.)
class LoraStrength(BaseModel):

    lora: str = Field(
        validation_alias=AliasChoices("lora", "path"),
        description="An exported LoRA's name (list-exported-models) or a .safetensors path.",
    )
    strength_model: float = Field(
        1.0, ge=-MAX_STRENGTH, le=MAX_STRENGTH, description="UNet weight, as ComfyUI's strength_model."
    )
    strength_clip: float | None = Field(
        None,
        ge=-MAX_STRENGTH,
        le=MAX_STRENGTH,
        description="Text-encoder weight, as ComfyUI's strength_clip; default strength_model.",
    )


class GenerationRequest(BaseModel):
    """generate-image's arguments, the server's generation request, a job's request.json and the renderer's
    input. The server fills in `model_name` and the LoRAs' paths before anything renders."""

    prompt: str = Field(description="What to draw; start with the LoRA's trigger word.")
    model_name: str | None = Field(None, description="Base model; default: the first LoRA's base model.")
    negative_prompt: str = Field(
        "",
        description="What to avoid, for the models guided against a negative prompt (all but FLUX and FLUX.2, "
        "which are guidance-distilled, and Z-Image Turbo at guidance 0, which ignore it).",
    )
    loras: list[LoraStrength] = Field(default_factory=list, description="LoRAs to apply, in order.")
    steps: Steps = Field(DEFAULT_STEPS, description="Denoising steps.")
    guidance: float | None = Field(
        None,
        ge=0.0,
        le=30.0,
        description=f"Guidance scale; default by model family: {default_guidances()}.",
    )
    width: int | None = Field(None, description="Pixels; default: the model's native size.")
    height: int | None = Field(None, description="Pixels; default: the model's native size.")
    seed: Seed = Field(0, description="Seed of the first image; image i uses seed + i.")
    count: int = Field(1, ge=1, le=16, description="Images to make.")
    strengths: list[float] | None = Field(
        None, description="compare-lora-strengths: one image per strength of loras[0] (same seed), and a grid."
    )

    @model_validator(mode="after")
    def _strengths_within_bounds(self) -> GenerationRequest:
        check_strengths(self.strengths)
        return self


class StrengthComparison(BaseModel):
    """compare-lora-strengths' arguments: one LoRA across strengths with one seed."""

    lora: str = Field(description="An exported LoRA's name or a .safetensors path.")
    prompt: str = Field(description="A prompt with the LoRA's trigger word.")
    strengths: list[float] = Field(DEFAULT_COMPARED_STRENGTHS, min_length=2, max_length=8)
    model_name: str | None = Field(None, description="Base model; default: the LoRA's own base model.")
    steps: Steps = DEFAULT_STEPS
    seed: Seed = 0

    @model_validator(mode="after")
    def _strengths_within_bounds(self) -> StrengthComparison:
        check_strengths(self.strengths)
        return self

    def as_generation(self) -> GenerationRequest:
        return GenerationRequest(
            prompt=self.prompt,
            model_name=self.model_name,
            loras=[LoraStrength(lora=self.lora)],
            steps=self.steps,
            seed=self.seed,
            strengths=self.strengths,
        )


class Renderer:
    """A base model with LoRAs loaded as named adapters (lora0, lora1, ...), rendering one image at a time
    at any per-LoRA weights: what generate-image, compare-lora-strengths and evaluate-lora render with."""

    def __init__(self, model_name: str, loras: list[LoraStrength]):
        import torch

        from training.models.loading import load_base_model, pick_device
        from training.models.source import resolve_model

        self.device = pick_device()
        # bf16 weights on a GPU with native bf16 (Ampere, compute capability 8.0, and newer; FLUX in fp32 would
        # need ~67 GB); fp32 elsewhere, where bf16 would only be emulated.
        bf16 = self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) >= (8, 0)
        self.base = load_base_model(resolve_model(model_name), self.device, mixed_precision="bf16" if bf16 else "no")
        self.pipe = self.base.pipeline
        self.names = [f"lora{i}" for i in range(len(loras))]
        for name, lora in zip(self.names, loras):
            self.pipe.load_lora_weights(lora.lora, adapter_name=name)
        self._parts = {
            part
            for part in ("unet", "transformer", "text_encoder", "text_encoder_2")
            if getattr(self.pipe, part, None) is not None and part in self.pipe._lora_loadable_modules
        }

    def render(
        self,
        prompt: str,
        weights: list[dict[str, float]],
        seed: int,
        *,
        steps: int,
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
        negative_prompt: str = "",
    ):
        """One image; `weights` are the first len(weights) LoRAs' per-component weights (`lora_weights`)."""
        import torch

        if weights:
            self.pipe.set_adapters(
                self.names[: len(weights)],
                [{part: w for part, w in weight.items() if part in self._parts} for weight in weights],
            )
        family = self.base.family_rules
        # Only where the family guides against one: the guidance-distilled pipelines ignore it (FLUX.1's) or take
        # no negative_prompt at all (FLUX.2's).
        negative = {"negative_prompt": negative_prompt or family.empty_negative_prompt}
        return self.pipe(
            prompt=prompt,
            **(negative if family.uses_negative_prompt else {}),
            num_inference_steps=steps,
            **{family.guidance_argument: family.loaded_sample_guidance(self.pipe) if guidance is None else guidance},
            width=width or self.base.native_resolution,
            height=height or self.base.native_resolution,
            generator=torch.Generator(self.device).manual_seed(seed),
        ).images[0]


def generate(
    request: GenerationRequest,
    out_dir: Path,
    *,
    on_image: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
) -> list[Path]:
    """Render the request into `out_dir/samples/` (PNG files and index.jsonl rows); returns the files
    written (for a strength comparison the last one is the grid)."""
    from training.run_files import RunFiles
    from training.workspace import atomic_output

    files = RunFiles(out_dir)
    files.samples.mkdir(parents=True, exist_ok=True)
    files.samples_index.unlink(missing_ok=True)  # a resumed job renders every image again
    renderer = Renderer(request.model_name, request.loras)

    if request.strengths is not None:
        lora = request.loras[0]
        plan = [([lora_weights(lora, strength)], f"strength {strength:g}") for strength in request.strengths]
        seeds = [request.seed] * len(plan)
    else:
        plan = [([lora_weights(lora) for lora in request.loras], "") for _ in range(request.count)]
        seeds = [request.seed + i for i in range(request.count)]

    written: list[Path] = []
    images = []
    for index, ((weights, label), seed) in enumerate(zip(plan, seeds)):
        if stop is not None and stop.is_set():
            break
        image = renderer.render(
            request.prompt,
            weights,
            seed,
            steps=request.steps,
            guidance=request.guidance,
            width=request.width,
            height=request.height,
            negative_prompt=request.negative_prompt,
        )
        path = files.samples / f"image_{index:02d}.png"
        with atomic_output(path) as tmp:
            image.save(tmp, format="PNG")
        prompt = f"{request.prompt} ({label})" if label else request.prompt
        files.append_sample({"step": 0, "prompt_index": index, "prompt": prompt, "seed": seed, "file": path.name})
        written.append(path)
        images.append((image, label))
        if on_image:
            on_image(index + 1, len(plan))
    if request.strengths is not None and len(images) == len(plan):
        path = files.samples / "grid.png"
        with atomic_output(path) as tmp:
            strength_grid(images).save(tmp, format="PNG")
        files.append_sample(
            {"step": 0, "prompt_index": len(plan), "prompt": f"{request.prompt} (grid)", "file": path.name}
        )
        written.append(path)
    return written


def lora_weights(lora: LoraStrength, strength: float | None = None) -> dict[str, float]:
    """The per-component adapter weights of one LoRA (a strength comparison sets both parts to it);
    the CLIP strength applies to every text encoder (SDXL has two)."""
    model = lora.strength_model if strength is None else strength
    clip = model if strength is not None or lora.strength_clip is None else lora.strength_clip
    return {"unet": model, "transformer": model, "text_encoder": clip, "text_encoder_2": clip}


def strength_grid(images: list) -> object:
    """The images side by side, each labelled below with its strength."""
    from PIL import Image, ImageDraw

    width, height = images[0][0].size
    grid = Image.new("RGB", (width * len(images), height + GRID_LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, label) in enumerate(images):
        grid.paste(image, (index * width, 0))
        draw.text((index * width + 4, height + 4), label, fill=(0, 0, 0))
    return grid


def run_generation_job(run_dir: Path, stop: threading.Event) -> str:
    """The background job: the request in `run_dir/request.json`, its images and status there."""
    from training.background_job import job_files

    request = GenerationRequest.model_validate_json((run_dir / "request.json").read_text(encoding="utf-8"))
    total = len(request.strengths) if request.strengths is not None else request.count
    with job_files(run_dir, log, total) as (_, status):
        status.start()
        try:
            log.info("generating %d image(s) with %s and %d LoRA(s)", total, request.model_name, len(request.loras))

            def progress(done: int, of: int) -> None:
                status.update(step=done, latest_samples=[f"image_{i:02d}.png" for i in range(done)])
                log.info("image %d/%d done", done, of)

            written = generate(request, run_dir, on_image=progress, stop=stop)
            if stop.is_set() and len(written) < total:
                status.finish("stopped")
                return "stopped"
            status.finish("completed", latest_samples=[p.name for p in written])
            log.info("done: %s", ", ".join(p.name for p in written))
            return "completed"
        except Exception as exc:
            log.exception("generation failed")
            status.finish("failed", error=f"{type(exc).__name__}: {exc}")
            return "failed"


def main(argv: list[str] | None = None) -> int:
    """`python -m training.generation RUN_DIR`: the server's background image generation."""
    from training.background_job import job_main

    return job_main("training.generation", argv, run_generation_job)


if __name__ == "__main__":
    from training.jobs.queue import exit_as_job

    exit_as_job(main)  # a job the queue started ends its row and starts the next queued job, server or not
