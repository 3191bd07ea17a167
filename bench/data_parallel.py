"""Data-parallel throughput: images per second of 2 processes x 1 thread against 1 process x 1 thread.

Conditions (issue 14's): `lora-train` on builtin:tiny-sd15, 64 px, batch 4 per process, rank 4, cached
latents and text, no sampling, OMP_NUM_THREADS=1 in every process, so each process has one core of this
2-core machine. The 2-process run launches through Accelerate (gloo on the CPU) exactly as a GPU user's
does. A run's step time is the median of its optimizer steps, timed end to end from metrics.jsonl (the
first 5 left out: warm-up), so it includes the gradient all-reduce; images per second is the global batch
(4 x processes) over it. The variants alternate, `--runs` times each; each variant's figure is the median.

    python bench/data_parallel.py [--runs 3] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BATCH, RANK, RESOLUTION, WARM_UP = 4, 4, 64, 5


def images_per_second(root: Path, dataset: Path, processes: int, steps: int, run: int) -> float:
    from training.config import TrainingConfig
    from training.workspace import atomic_write_text

    name = f"dp{processes}-{run}"
    config = TrainingConfig.from_dict(
        dict(
            name=name,
            model_name="builtin:tiny-sd15",
            dataset_path=str(dataset),
            resolution=RESOLUTION,
            steps=steps,
            batch_size=BATCH,
            rank=RANK,
            num_processes=processes,
            disable_sampling=True,
            save_every=steps + 1,
        )
    )
    config_file, run_dir = root / f"{name}.yaml", root / f"run-{name}"
    atomic_write_text(config_file, config.to_yaml())
    subprocess.run(
        [sys.executable, "-m", "training.cli", str(config_file), "--run-dir", str(run_dir), "--quiet"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=True,
        stdout=subprocess.DEVNULL,
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = [row["time"] for row in rows if "kind" not in row][WARM_UP:]  # optimizer steps, after warm-up
    step_s = statistics.median(b - a for a, b in zip(ends, ends[1:]))
    return BATCH * processes / step_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    from training.data.synthetic import make_shape_dataset

    root = Path(tempfile.mkdtemp(prefix="bench-dp-"))
    os.environ.update(LORA_MCP_HOME=str(root), HF_HUB_OFFLINE="1")
    dataset = root / "dataset"
    make_shape_dataset(dataset, 4 * BATCH, trigger_word="xyz_shape")  # two global batches of the 2-process run
    results: dict[int, list[float]] = {1: [], 2: []}
    for run in range(args.runs):
        for processes in (1, 2):
            results[processes].append(images_per_second(root, dataset, processes, args.steps, run))
            print(f"run {run + 1}: {processes} process(es): {results[processes][-1]:.1f} images/s", flush=True)
    one, two = (statistics.median(results[p]) for p in (1, 2))
    print(f"median images/s: 1 process {one:.1f}, 2 processes {two:.1f}: {two / one:.2f}x (bound: 1.7x)")


if __name__ == "__main__":
    main()
