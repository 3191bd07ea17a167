"""What a run records for the diagnostic rules besides its training loss: statistics of each
sample image, how far the LoRA has moved the weights it adapts, and the validation loss.

Image distances are the mean absolute difference of two images reduced to 64x64 RGB in [0, 1]:
0 for identical images; ~0.3 between unrelated photos; a LoRA that changed nothing leaves the
samples of a fixed seed at exactly 0 from their baseline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from training.image_files import upright_image

if TYPE_CHECKING:
    from training.config import TrainingConfig
    from training.placement import Placement
    from training.run_files import RunFiles
    from training.validation import ValidationSet

log = logging.getLogger("training")

THUMBNAIL = 64  # px: enough for composition and colour, blind to the noise of a few sampler steps
TOP_LAYERS = 5  # layers named in an update row
# An auto_stop_on condition must hold at this many checks in a row (validation_every steps apart): diffusion
# loss is noisy, and one window of a healthy flat run can look like a plateau.
AUTO_STOP_CHECKS = 3


def thumbnail(image: Image.Image | Path) -> np.ndarray:
    """(64, 64, 3) floats in [0, 1]; the whole image, squashed to a square."""
    if isinstance(image, Path):
        with upright_image(image) as opened:
            return thumbnail(opened)
    small = image.convert("RGB").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float32) / 255.0


def image_stats(pixels: np.ndarray) -> dict[str, float]:
    """Brightness (mean), contrast (standard deviation of the luminance) and mean HSV saturation."""
    luminance = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    high, low = pixels.max(axis=2), pixels.min(axis=2)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
    return {
        "mean": round(float(luminance.mean()), 4),
        "contrast": round(float(luminance.std()), 4),
        "saturation": round(float(saturation.mean()), 4),
    }


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return round(float(np.abs(a - b).mean()), 4)


class SampleStatistics:
    """The statistics row of each sample: its own numbers, its distance from the same prompt's
    baseline (step 0) and previous sample, and for trigger prompts the distance to the nearest
    training image (small and falling: the LoRA is reproducing its data)."""

    def __init__(self, training_images: list[Path]):
        self._training_images = training_images
        self._training: np.ndarray | None = None  # (N, 64, 64, 3), made at the first trigger sample

    def row(self, image: Image.Image, *, baseline: Path | None, previous: Path | None, control: bool) -> dict:
        pixels = thumbnail(image)
        row: dict = image_stats(pixels)
        row["baseline_distance"] = distance(pixels, thumbnail(baseline)) if baseline and baseline.exists() else None
        row["previous_distance"] = distance(pixels, thumbnail(previous)) if previous and previous.exists() else None
        row["nearest_training_distance"] = None if control else self._nearest_training(pixels)
        return row

    def _nearest_training(self, pixels: np.ndarray) -> float | None:
        if self._training is None:
            self._training = np.stack([thumbnail(p) for p in self._training_images]) if self._training_images else None
        if self._training is None:
            return None
        return round(float(np.abs(self._training - pixels).mean(axis=(1, 2, 3)).min()), 4)


def lora_update_row(models: dict[str, torch.nn.Module], step: int) -> dict:
    """||scale * B A||_F / ||W||_F for every LoRA layer of `models` ({prefix: model}), summarised.

    ||BA||_F^2 = sum((B^T B) * (A A^T)): two rank x rank products, so even rank 128 on every
    attention projection of SD 1.5 costs milliseconds, and no full-size delta is formed."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    ratios: dict[str, float] = {}
    with torch.no_grad():
        for prefix, model in models.items():
            for name, module in model.named_modules():
                if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                    continue
                down = module.lora_A["default"].weight.float().flatten(1)  # (rank, in)
                up = module.lora_B["default"].weight.float().flatten(1)  # (out, rank)
                delta = torch.sqrt(((up.T @ up) * (down @ down.T)).sum().clamp(min=0)) * module.scaling["default"]
                # peft's own dequantization: 8-bit base weights (quantize_base) are read as real values
                base = dequantize_module_weight(module.get_base_layer()).float().norm()
                ratios[f"{prefix}.{name}"] = float(delta / base) if base > 0 else 0.0
    values = list(ratios.values()) or [0.0]
    top = sorted(ratios.items(), key=lambda item: item[1], reverse=True)[:TOP_LAYERS]
    return {
        "kind": "lora_update",
        "step": step,
        "mean_ratio": float(np.mean(values)),
        "max_ratio": float(max(values)),
        "top_layers": {name: round(value, 6) for name, value in top},
    }


class EvidenceRecorder:
    """Every `validation_every` steps (and at step 0 and the last step): the validation loss, when
    there are held-out images, and the LoRA's update size, as rows of metrics.jsonl; then the
    `auto_stop_on` checks, which read the run's evidence back like diagnose-training does."""

    def __init__(
        self,
        files: RunFiles,
        config: TrainingConfig,
        validation: ValidationSet | None,
        lora_models,
        model_family: str | None = None,
    ):
        self._files = files
        self._family = model_family  # the rules judge loss levels by it (flow matching's sit higher)
        self._config = config
        self._validation = validation
        self._lora_models = lora_models  # () -> {prefix: model with adapters}
        self._met: dict[str, int] = {}  # auto_stop_on condition -> checks in a row that met it

    def due(self, step: int) -> bool:
        return step == 0 or step % self._config.validation_every == 0 or step == self._config.steps

    def record(self, step: int, placement: Placement, train_loss: float | None) -> float | None:
        """`train_loss`: the smoothed training loss now, so each validation row also records the gap
        between the two (rising while training loss falls: overfitting). Returns the validation loss (None
        without held-out images)."""
        loss = None
        if self._validation is not None:
            loss = self._validation.loss(placement.weight_dtype, placement.autocast)
            row = {"kind": "validation", "step": step, "loss": loss, "images": len(self._validation.records)}
            if train_loss is not None:
                row.update(train_loss=train_loss, gap=loss - train_loss)
            self._files.append_metric(row)
            log.info("step %d validation loss %.4f (%d held-out images)", step, loss, len(self._validation.records))
        self._files.append_metric(lora_update_row(self._lora_models(), step))
        return loss

    def recommended_checkpoint(self) -> int | None:
        """The step of the checkpoint diagnose-training would recommend, which pruning keeps."""
        from training.diagnostics.checkpoints import recommend_checkpoint
        from training.diagnostics.evidence import RunEvidence

        steps = [step for step, _ in self._files.list_checkpoints()]
        choice = recommend_checkpoint(RunEvidence.from_run_dir(self._files.dir), steps)
        return choice.step if choice else None

    def stop_reason(self) -> str | None:
        """The first `auto_stop_on` condition the run's evidence has met at AUTO_STOP_CHECKS checks in a
        row, as a sentence; None to go on."""
        if not self._config.auto_stop_on:
            return None
        from training.diagnostics.evidence import RunEvidence
        from training.diagnostics.training_rules import AUTO_STOP_RULES

        evidence = RunEvidence.from_run_dir(self._files.dir).model_copy(update={"model_family": self._family})
        for condition in self._config.auto_stop_on:
            if condition not in AUTO_STOP_RULES:  # memory_spill: the trainer's MemoryWatch checks it every 10 steps
                continue
            findings = [rule(evidence) for rule in AUTO_STOP_RULES[condition]]
            finding = next((f for f in findings if f is not None and f.severity != "info"), None)
            self._met[condition] = self._met.get(condition, 0) + 1 if finding else 0
            if finding and self._met[condition] >= AUTO_STOP_CHECKS:
                return f"auto_stop_on {condition}: {finding.message}"
        return None
