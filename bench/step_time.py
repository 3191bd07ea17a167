"""Trainer overhead against a bare hand-written LoRA loop (the floor).

Conditions (the engine issue's): tiny SD 1.x, 64 px, batch 4, rank 4, 40 steps, cached
latents and text embeddings, no sampling. Each variant runs in its own process (so peak RSS
is its own), alternating, 3 times; a run's step time is the median of its steps, and the
result per variant is the median of its runs.

    python bench/step_time.py [--runs 3] [--steps 40]

Trainer step time is taken from metrics.jsonl `time` (the end of each optimizer step), so it
includes all per-step bookkeeping (metrics line, status, schedule); the loop times itself
the same way, end of step to end of step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, RANK, RESOLUTION, LR = 4, 4, 64, 1e-3


def bare_loop(dataset: Path, steps: int) -> list[float]:
    """The floor: the same model, adapters, batch and update, with nothing around it."""
    import torch
    import torch.nn.functional as F

    from training.data.images import load_pixels
    from training.lora import attach_lora
    from training.models.loading import load_base_model
    from training.models.source import resolve_model

    base = load_base_model(resolve_model("builtin:tiny-sd15"), torch.device("cpu"))
    images = sorted(dataset.glob("*.png"))[:BATCH]
    with torch.no_grad():
        pixels = torch.stack(
            [load_pixels(p, (RESOLUTION, RESOLUTION), random_crop=False, flip=False, rng=None) for p in images]
        )
        latents = base.vae.encode(pixels).latent_dist.sample() * base.vae.config.scaling_factor
        ids = base.tokenizer(
            [p.with_suffix(".txt").read_text() for p in images],
            padding="max_length",
            max_length=77,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        states = base.text_encoder(ids).last_hidden_state
    attach_lora(base.lora_models, rank=RANK, alpha=RANK, dropout=0.0, seed=42, train_text_encoder=False)
    params = [p for p in base.denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=1e-2)
    scheduler = base.noise_scheduler
    generator = torch.Generator().manual_seed(42)
    base.denoiser.train()
    ends = [time.perf_counter()]
    for _ in range(steps):
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (BATCH,), generator=generator)
        prediction = base.denoiser(scheduler.add_noise(latents, noise, timesteps), timesteps, states).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        ends.append(time.perf_counter())
    return [b - a for a, b in zip(ends, ends[1:])]


def trainer(dataset: Path, steps: int) -> list[float]:
    from training.config import TrainingConfig
    from training.trainer import run_training

    config = TrainingConfig.from_dict(
        dict(
            name="bench",
            model_name="builtin:tiny-sd15",
            dataset_path=str(dataset),
            resolution=RESOLUTION,
            steps=steps,
            batch_size=BATCH,
            rank=RANK,
            learning_rate=LR,
            cache_latents=True,
            disable_sampling=True,
            save_every=steps + 1,
        )
    )
    run_dir = Path(tempfile.mkdtemp(prefix="bench-run-"))
    result = run_training(config, run_dir)
    assert result.state == "completed", result.error
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "kind" not in row]  # optimizer steps only, not validation / update rows
    ends = [row["time"] for row in rows]
    # Step 1 ends `step_time` after it starts; later steps are timed end to end.
    return [rows[0]["step_time"]] + [b - a for a, b in zip(ends, ends[1:])]


def child(variant: str, dataset: Path, steps: int) -> None:
    times = (bare_loop if variant == "loop" else trainer)(dataset, steps)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"variant": variant, "median_step_s": statistics.median(times), "peak_rss_mib": peak_mib}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--child", choices=["loop", "trainer"])
    parser.add_argument("--dataset", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dataset, args.steps)
        return

    from training.data.synthetic import make_shape_dataset

    workspace = Path(tempfile.mkdtemp(prefix="bench-"))
    env = {**os.environ, "LORA_MCP_HOME": str(workspace), "HF_HUB_OFFLINE": "1"}
    dataset = workspace / "dataset"
    make_shape_dataset(dataset, BATCH, trigger_word="xyz_shape")
    results: dict[str, list[dict]] = {"loop": [], "trainer": []}
    for run in range(args.runs):
        for variant in ("loop", "trainer"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", variant, "--dataset", str(dataset), "--steps", str(args.steps)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            row = json.loads(out.strip().splitlines()[-1])
            results[variant].append(row)
            step_ms, rss = row["median_step_s"] * 1000, row["peak_rss_mib"]
            print(f"run {run + 1} {variant:8s} median step {step_ms:7.2f} ms  peak RSS {rss:7.1f} MiB")
    loop_step = statistics.median(r["median_step_s"] for r in results["loop"])
    trainer_step = statistics.median(r["median_step_s"] for r in results["trainer"])
    loop_rss = statistics.median(r["peak_rss_mib"] for r in results["loop"])
    trainer_rss = statistics.median(r["peak_rss_mib"] for r in results["trainer"])
    print(f"loop    : {loop_step * 1000:.2f} ms/step, peak RSS {loop_rss:.1f} MiB")
    print(f"trainer : {trainer_step * 1000:.2f} ms/step, peak RSS {trainer_rss:.1f} MiB")
    print(f"ratio   : step time {trainer_step / loop_step:.3f}x, peak memory {trainer_rss / loop_rss:.3f}x")


if __name__ == "__main__":
    main()
