"""Sample images of the test prompts during training, with a fixed seed so that the images of
successive steps differ only by what the LoRA learned."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from training.prompts import encode_prompts
from training.workspace import atomic_output

if TYPE_CHECKING:
    from training.config import TrainingConfig
    from training.models.loading import BaseModel
    from training.run_files import RunFiles


def render_samples(base: BaseModel, config: TrainingConfig, files: RunFiles, step: int) -> list[str]:
    """Render every test prompt at `step`; returns the file names written.

    Runs under fork_rng: sampling draws no numbers from the training RNG streams, so a run
    with sampling trains exactly like one without (and resume stays exact).
    """
    devices = [base.unet.device] if base.unet.device.type == "cuda" else []
    written = []
    was_training = base.unet.training
    base.unet.eval()
    base.text_encoder.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            negative = _encode(base, config, [""])
            for index, prompt in enumerate(config.test_prompts):
                generator = torch.Generator(base.unet.device).manual_seed(config.seed)
                image = base.pipeline(
                    prompt_embeds=_encode(base, config, [prompt]),
                    negative_prompt_embeds=negative,
                    height=config.resolution,
                    width=config.resolution,
                    num_inference_steps=config.sample_steps,
                    guidance_scale=config.sample_guidance_scale,
                    generator=generator,
                ).images[0]
                path = files.sample_image(step, index)
                with atomic_output(path) as tmp:
                    image.save(tmp, format="PNG")
                files.append_sample(
                    {"step": step, "prompt_index": index, "prompt": prompt, "seed": config.seed, "file": path.name}
                )
                written.append(path.name)
    finally:
        base.unet.train(was_training)
    return written


def _encode(base: BaseModel, config: TrainingConfig, prompts: list[str]) -> torch.Tensor:
    return encode_prompts(
        base.tokenizer, base.text_encoder, prompts, max_token_length=config.max_token_length, clip_skip=config.clip_skip
    )
