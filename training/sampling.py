"""Sample images of the test prompts during training, with a fixed seed so that the images of
successive steps differ only by what the LoRA learned.

Next to the test prompts, a control prompt without the trigger word is rendered: a LoRA that
changes it is bleeding into what it should leave alone. Each image's statistics go into its row
of samples/index.jsonl (training/run_evidence.py).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from training.data.captions import fill_trigger
from training.prompts import TextConditioning, encode_text
from training.workspace import atomic_output, read_jsonl

if TYPE_CHECKING:
    from PIL.Image import Image

    from training.config import TrainingConfig
    from training.models.loading import LoadedModel
    from training.placement import Placement
    from training.run_evidence import SampleStatistics
    from training.run_files import RunFiles


def rendered_prompts(config: TrainingConfig) -> list[str]:
    """The test prompts as rendered: `[trigger]` (ai-toolkit's placeholder) replaced by the trigger word."""
    return [fill_trigger(prompt, config.trigger_word) for prompt in config.test_prompts]


def control_prompt(config: TrainingConfig) -> str | None:
    """The configured control prompt, else the first test prompt with its trigger words taken out
    (None when nothing is left, or there are no test prompts)."""
    if config.control_prompt:
        return config.control_prompt
    if not config.test_prompts:
        return None
    first = prompt = rendered_prompts(config)[0]
    for word in [config.trigger_word, *config.trigger_words.values()]:
        if word:
            prompt = re.sub(rf"(?<![\w-]){re.escape(word)}(?![\w-])", " ", prompt)
    prompt = re.sub(r"\s+", " ", re.sub(r"^[\s,]+|[\s,]+$", "", prompt)).strip()
    return prompt if prompt and prompt != first else None


def render(base: LoadedModel, placement: Placement, *, height: int, width: int, **arguments) -> list[Image]:
    """Images from the base pipeline: the denoising loop under the run's autocast (the frozen weights
    are fp16/bf16 on CUDA, the prompt states fp32), the VAE decode in the VAE's own type, which is
    fp32 under fp16 (SD and SDXL VAEs overflow in fp16; autocast would run it in fp16 anyway)."""
    with placement.autocast():
        latents = base.pipeline(height=height, width=width, output_type="latent", **arguments).images
    vae = base.vae
    latents = base.family_rules.sample_latents(base, latents, height, width)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return base.pipeline.image_processor.postprocess(pixels, output_type="pil")


def render_samples(
    base: LoadedModel,
    placement: Placement,
    config: TrainingConfig,
    files: RunFiles,
    step: int,
    stats: SampleStatistics,
) -> list[str]:
    """Render every test prompt, then the control prompt, at `step`; returns the file names written.

    Runs under fork_rng: sampling draws no numbers from the training RNG streams, so a run
    with sampling trains exactly like one without (and resume stays exact).
    """
    devices = [base.device] if base.device.type in ("cuda", "mps") else []
    device_type = devices[0].type if devices else "cuda"  # torch's default: unused without devices
    written = []
    models = list(base.lora_models.values())  # eval: no LoRA dropout in samples; modes restored after
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        with torch.random.fork_rng(devices=devices, device_type=device_type), torch.no_grad():
            control = control_prompt(config)
            prompts = rendered_prompts(config) + ([control] if control else [])
            previous = _previous_samples(files, step)
            for index, prompt in enumerate(prompts):
                generator = torch.Generator(base.device).manual_seed(config.seed)
                [image] = render(
                    base,
                    placement,
                    **prompt_arguments(base, config, [prompt]),
                    height=config.resolution,
                    width=config.resolution,
                    num_inference_steps=config.sample_steps,
                    guidance_scale=config.sample_guidance_scale,
                    generator=generator,
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
    finally:
        for model, mode in zip(models, was_training):
            model.train(mode)
    return written


def prompt_arguments(base: LoadedModel, config: TrainingConfig, prompts: list[str]) -> dict:
    """The pipeline's prompt arguments for `prompts`, encoded by this run's text encoders wherever they
    are (low_vram keeps them on the CPU) and outside autocast (T5 overflows in fp16), then moved to the
    denoiser's device: the states, for SDXL and FLUX the pooled embeddings, and for SD and SDXL an empty
    negative prompt for classifier-free guidance (FLUX's guidance is an input of the distilled model)."""
    device = base.device

    def encoded(texts: list[str]) -> TextConditioning:
        text = encode_text(base, texts, max_token_length=config.max_token_length, clip_skip=config.clip_skip)
        return TextConditioning(text.states.to(device), None if text.pooled is None else text.pooled.to(device))

    positive = encoded(prompts)
    arguments = {"prompt_embeds": positive.states}
    if positive.pooled is not None:
        arguments["pooled_prompt_embeds"] = positive.pooled
    if base.family_rules.uses_negative_prompt:
        negative = encoded([""] * len(prompts))
        arguments["negative_prompt_embeds"] = negative.states
        if negative.pooled is not None:
            arguments["negative_pooled_prompt_embeds"] = negative.pooled
    return arguments


def _previous_samples(files: RunFiles, step: int) -> dict[int, str]:
    """The latest earlier sample file of each prompt index (from samples/index.jsonl, so a resumed
    run finds them too)."""
    latest: dict[int, tuple[int, str]] = {}
    for row in read_jsonl(files.samples_index):
        if row["step"] < step and row["step"] >= latest.get(row["prompt_index"], (-1, ""))[0]:
            latest[row["prompt_index"]] = (row["step"], row["file"])
    return {index: name for index, (_, name) in latest.items()}
