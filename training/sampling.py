"""Sample images of the test prompts during training, with a fixed seed so that the images of
successive steps differ only by what the LoRA learned.

Next to the test prompts, a control prompt without the trigger word is rendered: a LoRA that
changes it is bleeding into what it should leave alone. Each image's statistics go into its row
of samples/index.jsonl (training/run_evidence.py). A round of samples that runs past sample_timeout_s is
abandoned between two denoising steps, with a warning, and training goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from training.data.captions import control_prompt, rendered_prompts
from training.data.loader import moved_text
from training.prompts import TextConditioning, encode_text
from training.workspace import atomic_output, read_jsonl

if TYPE_CHECKING:
    from PIL.Image import Image

    from training.config import TrainingConfig
    from training.models.loading import LoadedModel
    from training.placement import Placement
    from training.run_evidence import SampleStatistics
    from training.run_files import RunFiles

log = logging.getLogger("training")


class SamplingTimedOut(Exception):
    """A round of samples ran past sample_timeout_s (raised between two denoising steps)."""


@dataclass(frozen=True)
class SampleRound:
    files: list[str]  # the images written at this step (fewer than the prompts when it timed out)
    timed_out: str | None = None  # the warning, when sample_timeout_s cut the round short


def render(base: LoadedModel, placement: Placement, *, height: int, width: int, **arguments) -> list[Image]:
    """Images from the base pipeline: the denoising loop under the run's autocast (the frozen weights
    are fp16/bf16 on CUDA, the prompt states fp32), the VAE decode in the VAE's own type, which is
    fp32 under fp16 (SD and SDXL VAEs overflow in fp16; autocast would run it in fp16 anyway)."""
    with placement.autocast():
        latents = base.pipeline(height=height, width=width, output_type="latent", **arguments).images
    latents = base.family_rules.sample_latents(base, latents, height, width)
    pixels = base.family_rules.decode_latents(base.vae, latents)
    finite = torch.isfinite(pixels).flatten(1).all(dim=1).tolist()
    images = base.pipeline.image_processor.postprocess(pixels, output_type="pil")
    for image, ok in zip(images, finite):
        image.info["non_finite"] = not ok  # NaN/inf pixels (an fp16 VAE overflowing) are saved as black
    return images


def render_samples(
    base: LoadedModel,
    placement: Placement,
    config: TrainingConfig,
    files: RunFiles,
    step: int,
    stats: SampleStatistics,
) -> SampleRound:
    """Render every test prompt, then the control prompt, at `step`; returns the file names written, and the
    warning when the round ran past sample_timeout_s (logged, and a `sample_timeout` row in metrics.jsonl).

    Runs under fork_rng: sampling draws no numbers from the training RNG streams, so a run
    with sampling trains exactly like one without (and resume stays exact).
    """
    devices = [base.device] if base.device.type in ("cuda", "mps") else []
    device_type = devices[0].type if devices else "cuda"  # torch's default: unused without devices
    written: list[str] = []
    models = list(base.lora_models.values())  # eval: no LoRA dropout in samples; modes restored after
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    control = control_prompt(config)
    prompts = rendered_prompts(config) + ([control] if control else [])
    started = time.monotonic()
    try:
        with torch.random.fork_rng(devices=devices, device_type=device_type), torch.no_grad():
            previous = _previous_samples(files, step)
            limit = _time_limit(started + config.sample_timeout_s) if config.sample_timeout_s else {}
            for index, prompt in enumerate(prompts):
                generator = torch.Generator(base.device).manual_seed(config.seed)
                [image] = render(
                    base,
                    placement,
                    **prompt_arguments(base, config, [prompt]),
                    height=config.resolution,
                    width=config.resolution,
                    num_inference_steps=config.sample_steps,
                    generator=generator,
                    **guidance_argument(base, config.sample_guidance_scale),
                    **limit,
                )
                path = files.sample_image(step, index)
                with atomic_output(path) as tmp:
                    image.save(tmp, format="PNG")
                is_control = index == len(config.test_prompts)
                row = {
                    "step": step,
                    "prompt_index": index,
                    "prompt": prompt,
                    "seed": config.seed,
                    "file": path.name,
                    "control": is_control,
                    "non_finite": image.info["non_finite"],
                }
                row.update(
                    stats.row(
                        image,
                        baseline=files.sample_image(0, index) if step > 0 else None,
                        previous=files.samples / previous[index] if index in previous else None,
                        control=is_control,
                    )
                )
                files.append_sample(row)
                written.append(path.name)
    except SamplingTimedOut:
        return SampleRound(written, _timed_out(files, config, step, time.monotonic() - started, written, prompts))
    finally:
        for model, mode in zip(models, was_training):
            model.train(mode)
    return SampleRound(written)


def _time_limit(deadline: float) -> dict:
    """The pipeline argument that ends a round past `deadline` (time.monotonic()), checked after every
    denoising step. A single step that never returns (a driver hang) cannot be cut short from inside the
    process; the heartbeat of status.json still tells a watcher the process lives."""

    def check(pipeline, step_index, timestep, tensors: dict) -> dict:
        if time.monotonic() > deadline:
            raise SamplingTimedOut
        return tensors

    return {"callback_on_step_end": check}


def _timed_out(
    files: RunFiles, config: TrainingConfig, step: int, seconds: float, written: list[str], prompts: list[str]
) -> str:
    """The warning of a round cut short, in train.log and as a `sample_timeout` metrics row (the
    sampling-timeout rule reads those)."""
    files.append_metric(
        {
            "kind": "sample_timeout",
            "step": step,
            "seconds": round(seconds, 3),
            "limit": config.sample_timeout_s,
            "rendered": len(written),
            "prompts": len(prompts),
        }
    )
    message = (
        f"sampling at step {step} abandoned after {seconds:.0f} s (sample_timeout_s {config.sample_timeout_s:g}), "
        f"{len(written)} of {len(prompts)} images rendered; training goes on. Sampling this slow usually means the "
        "GPU memory spilled into shared system memory, or sample_steps / resolution are high for this card: lower "
        "sample_steps, raise sample_every, or raise sample_timeout_s (0: no limit)."
    )
    log.warning("%s", message)
    return message


def prompt_arguments(base: LoadedModel, config: TrainingConfig, prompts: list[str]) -> dict:
    """The pipeline's prompt arguments for `prompts`, encoded by this run's text encoders wherever they
    are (low_vram keeps them on the CPU) and outside autocast (T5 overflows in fp16), then moved to the
    denoiser's device, as the family passes them (ModelFamily.prompt_arguments): the states, the pooled
    embeddings and text masks where it has them, and an empty negative prompt where it guides with one
    (classifier-free guidance; FLUX's guidance is an input of the distilled model)."""
    device = base.device

    def encoded(texts: list[str]) -> TextConditioning:
        text = encode_text(base, texts, max_token_length=config.max_token_length, clip_skip=config.clip_skip)
        return moved_text(text, device)

    positive = encoded(prompts)
    negative = encoded([""] * len(prompts)) if base.family_rules.uses_negative_prompt else None
    return base.family_rules.prompt_arguments(positive, negative)


def guidance_argument(base: LoadedModel, scale: float) -> dict:
    """The pipeline's guidance keyword argument: `guidance_scale`, Qwen-Image's `true_cfg_scale`."""
    return {base.family_rules.guidance_argument: scale}


def _previous_samples(files: RunFiles, step: int) -> dict[int, str]:
    """The latest earlier sample file of each prompt index (from samples/index.jsonl, so a resumed
    run finds them too)."""
    latest: dict[int, tuple[int, str]] = {}
    for row in read_jsonl(files.samples_index):
        if row["step"] < step and row["step"] >= latest.get(row["prompt_index"], (-1, ""))[0]:
            latest[row["prompt_index"]] = (row["step"], row["file"])
    return {index: name for index, (_, name) in latest.items()}
