"""Time to the first step against dataset size: `lora-train` on builtin:tiny-flux at 64 px with 100,
500 and 2,000 captioned images (each caption its own, so the text cache grows with the count).

The figure is the wall time from starting the process to the first step's row in metrics.jsonl: imports
and model loading (fixed) plus the dataset scan and the latent and text caching (per image). A line
t = fixed + per_image x images is fitted to the sizes, and each size's per-image cost above the fixed
part is printed, so a cost that grows with the count (not linear) shows as a rising column.

    python bench/first_step.py [--sizes 100 500 2000] [--model builtin:tiny-flux]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_dataset(folder: Path, count: int) -> Path:
    from training.data.synthetic import make_shape_dataset

    for index, image in enumerate(make_shape_dataset(folder, count)):
        caption = image.with_suffix(".txt")
        caption.write_text(f"xyz_shape number {index}, {caption.read_text()}", encoding="utf-8")
    return folder


def time_to_first_step(root: Path, dataset: Path, model: str, name: str) -> tuple[float, dict]:
    """Seconds from the process's start to its first metrics row, and the run's cache choices."""
    import yaml

    from training.config import TrainingConfig
    from training.workspace import atomic_write_text

    config = TrainingConfig.from_dict(
        dict(
            name=name,
            model_name=model,
            dataset_path=str(dataset),
            resolution=64,
            steps=1,
            batch_size=2,
            rank=4,
            trigger_word="xyz_shape",
            disable_sampling=True,
        )
    )
    config_file, run = root / f"{name}.yaml", root / f"run-{name}"
    atomic_write_text(config_file, config.to_yaml())
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "training.cli", str(config_file), "--run-dir", str(run), "--quiet"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and metrics.stat().st_size) and child.poll() is None:
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    _, stderr = child.communicate(timeout=300)
    if child.returncode != 0:
        raise SystemExit(f"{name} failed: {stderr[-2000:]}")
    written = yaml.safe_load((run / "config.yaml").read_text())
    choices = {k: written.get(k) for k in ("cache_latents_to_disk", "cache_text_encoder_outputs_to_disk")}
    return seconds, choices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 2000])
    parser.add_argument("--model", default="builtin:tiny-flux")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        os.environ.setdefault("LORA_MCP_HOME", str(root / "home"))
        # a first run builds the built-in model into the workspace and warms the page cache: not timed
        time_to_first_step(root, make_dataset(root / "warm-up", 4), args.model, "warm-up")
        times = {}
        for size in args.sizes:
            dataset = make_dataset(root / f"data{size}", size)
            seconds, choices = time_to_first_step(root, dataset, args.model, f"n{size}")
            times[size] = seconds
            print(f"{size:6d} images: {seconds:7.2f} s to the first step  {json.dumps(choices)}", flush=True)
    sizes = list(times)
    mean_n = sum(sizes) / len(sizes)
    mean_t = sum(times.values()) / len(sizes)
    per_image = sum((n - mean_n) * (times[n] - mean_t) for n in sizes) / sum((n - mean_n) ** 2 for n in sizes)
    fixed = mean_t - per_image * mean_n
    print(f"fit: {fixed:.2f} s + {1000 * per_image:.2f} ms x images")
    for n in sizes:
        print(f"{n:6d} images: {1000 * (times[n] - fixed) / n:.2f} ms per image above the fixed part")


if __name__ == "__main__":
    main()
