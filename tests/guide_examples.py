"""Train each of the guide's configs (examples/*.yaml) a few steps on a tiny model, as written except for
`model_name` and `dataset_path`: `python tests/guide_examples.py DATASET OUT.json EXAMPLE.yaml ...`.

A child of tests/test_examples.py: the FLUX example asks for 8-bit base weights, which need torchao, and
torchao stays beside the test environment (see the Makefile), on this process's path only. Each config
is set up by the real Trainer (its model, dataset, prior-preservation class images, optimizer and
schedule as written), trains `STEPS` optimizer steps of its own batch size and accumulation, and
finishes as a completed run, so a later example can resume from it by name (the progressive stages).
"""

from __future__ import annotations

import json
import math
import secrets
import shutil
import sys
import traceback
from pathlib import Path

STEPS = 2
# The tiny built-in of each family a guide example names (its model_name is a real checkpoint's id).
TINY_MODELS = {
    "sd1": "builtin:tiny-sd15",
    "sd2": "builtin:tiny-sd2-v",
    "sdxl": "builtin:tiny-sdxl",
    "flux": "builtin:tiny-flux",
    "sd3": "builtin:tiny-sd35",
    "chroma": "builtin:tiny-chroma",
    "qwen_image": "builtin:tiny-qwen-image",
    "z_image": "builtin:tiny-z-image",
    "flux2": "builtin:tiny-flux2",
}


def train_example(example: Path, dataset: Path) -> dict:
    import torch
    import yaml

    from training.config import TrainingConfig
    from training.families import guess_family
    from training.run_files import default_run_dir
    from training.trainer import Trainer

    written = yaml.safe_load(example.read_text(encoding="utf-8"))
    family = guess_family(written.get("model_name", TrainingConfig.model_fields["model_name"].default), None).id
    config = TrainingConfig.from_dict({**written, "model_name": TINY_MODELS[family], "dataset_path": str(dataset)})
    run_dir = Path(f"{default_run_dir(config.name)}-{secrets.token_hex(2)}")  # as the server names a job's run
    if config.prior_preservation:  # the class images as the run would find them: generating 200 is not the point
        class_dir = run_dir / "class_images"
        class_dir.mkdir(parents=True)
        picture = next(dataset.glob("*.png"))
        for number in range(config.num_class_images):
            shutil.copy(picture, class_dir / f"{number:04d}.png")
    trainer = Trainer(config, run_dir)
    trainer.setup()
    before = [p.detach().clone() for p in trainer.trainable]
    losses = [trainer._optimizer_step().loss for _ in range(STEPS)]
    changed = any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.trainable))
    result = trainer.cleanup(trainer.finish())
    return {
        "family": family,
        "state": result.state,
        "losses": losses,
        "finite": all(math.isfinite(loss) for loss in losses),
        "lora_changed": changed,
        "lora": str(result.lora_path),
        "class_prompt": trainer.config.class_prompt,
        "warnings": config.warnings([record.caption for record in trainer.dataset.images]),
    }


def main(dataset: str, out: str, *examples: str) -> None:
    results = {}
    for example in map(Path, examples):
        try:
            results[example.name] = train_example(example, Path(dataset))
        except Exception:
            results[example.name] = {"error": traceback.format_exc()}
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
