"""What the diagnostic rules look at: a run's config, its dataset and what it recorded.

Everything here is read from files (the run directory's `config.yaml`, `metrics.jsonl`,
`samples/index.jsonl`, `status.json`, evaluate-lora's `evaluation*.json`) or built by hand in tests;
a rule never touches a model.
The rows' fields are the run-directory contract (training/README.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from training.config import TrainingConfig
from training.evaluation.report import EvaluationReport, read_report
from training.workspace import read_jsonl


class TrainRow(BaseModel):
    """One optimizer step (a metrics.jsonl row without `kind`)."""

    step: int
    loss: float
    lr: float
    grad_norm: float | None = None  # None: an fp16 step the gradient scaler skipped
    step_time: float | None = None
    memory_gb: float | None = None  # CUDA: the device's memory in use after the step (every process's)
    files: list[str] = Field(default_factory=list, description="The images of the step's batch(es).")


class ValidationRow(BaseModel):
    """The deterministic loss over the held-out images (`kind: validation`)."""

    step: int
    loss: float
    images: int
    train_loss: float | None = None  # the smoothed training loss at that step (None at step 0)
    gap: float | None = None  # loss - train_loss: the train/validation divergence


class UpdateRow(BaseModel):
    """The LoRA's relative update size ||BA|| / ||W|| over its layers (`kind: lora_update`)."""

    step: int
    mean_ratio: float
    max_ratio: float
    top_layers: dict[str, float] = Field(default_factory=dict, description="The largest ratios, by layer.")


class SampleRow(BaseModel):
    """One sample image with its statistics (a samples/index.jsonl row). Distances are the mean absolute
    difference of the two images at 64x64 RGB, in [0, 1]: 0 is identical."""

    step: int
    prompt_index: int
    prompt: str
    file: str
    control: bool = False  # the control prompt (no trigger word), rendered to show style bleeding
    mean: float | None = None  # brightness, 0-1
    contrast: float | None = None  # standard deviation of the luminance, 0-0.5
    saturation: float | None = None  # mean HSV saturation, 0-1
    baseline_distance: float | None = None  # to the same prompt's step-0 image (None at step 0)
    previous_distance: float | None = None  # to the same prompt's previous sample
    nearest_training_distance: float | None = None  # to the closest training image (trigger prompts only)
    non_finite: bool = False  # the decoded image had NaN or infinite pixels (saved black)


class SampleTimeoutRow(BaseModel):
    """A round of samples abandoned past sample_timeout_s (`kind: sample_timeout`)."""

    step: int
    seconds: float
    limit: float
    rendered: int  # images written before it was abandoned
    prompts: int


class RunEvidence(BaseModel):
    """Everything a rule may use. Pre-flight rules see only `config`, `images` and `dataset`."""

    config: TrainingConfig
    images: int | None = Field(None, description="Training images in the dataset (validation excluded).")
    dataset: Any = Field(None, description="training.data.report.DatasetReport, where one was made.")
    native_resolution: int | None = Field(None, description="The base model's native resolution, where known.")
    model_family: str | None = Field(None, description="sd1, sd2, sdxl or flux, as read from the model's files.")
    state: str | None = Field(None, description="The run's state from status.json; None before it starts.")
    error: str | None = Field(None, description="The run's error from status.json (e.g. a non-finite loss).")
    train: list[TrainRow] = Field(default_factory=list)
    validation: list[ValidationRow] = Field(default_factory=list)
    updates: list[UpdateRow] = Field(default_factory=list)
    samples: list[SampleRow] = Field(default_factory=list)
    sample_timeouts: list[SampleTimeoutRow] = Field(default_factory=list)
    device_memory_gb: float | None = Field(None, description="Memory of the training device, where known.")
    bf16_native: bool | None = Field(
        None, description="Whether the training device runs bf16 fast (training.placement.native_bf16), where known."
    )
    evaluations: list[EvaluationReport] = Field(
        default_factory=list,
        description="What evaluate-lora measured: the checkpoints' by step, then the final LoRA's (step None).",
    )

    @classmethod
    def from_run_dir(cls, run_dir: Path, *, dataset: Any = None, images: int | None = None) -> RunEvidence:
        """The evidence a run directory holds (its resolved config, metrics, samples, state)."""
        config = TrainingConfig.load(run_dir / "config.yaml")
        train, validation, updates, timeouts = [], [], [], []
        for row in read_jsonl(run_dir / "metrics.jsonl"):
            kind = row.get("kind")
            if kind == "validation":
                validation.append(ValidationRow.model_validate(row))
            elif kind == "lora_update":
                updates.append(UpdateRow.model_validate(row))
            elif kind == "sample_timeout":
                timeouts.append(SampleTimeoutRow.model_validate(row))
            elif kind is None and row.get("loss") is not None:
                train.append(TrainRow.model_validate(row))
        samples = [SampleRow.model_validate(row) for row in read_jsonl(run_dir / "samples" / "index.jsonl")]
        try:
            status = json.loads((run_dir / "status.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            status = {}
        if images is None and dataset is not None:
            images = dataset.images
        return cls(
            config=config,
            images=images,
            dataset=dataset,
            state=status.get("state"),
            error=status.get("error"),
            device_memory_gb=status.get("device_memory_gb"),
            bf16_native=status.get("bf16_native"),
            train=train,
            validation=validation,
            updates=updates,
            samples=samples,
            sample_timeouts=timeouts,
            evaluations=read_evaluations(run_dir),
        )


CHECKPOINT_REPORT = re.compile(r"evaluation-step(\d+)\.json")  # training/evaluation/report.py's report_name(step)


def read_evaluations(run_dir: Path) -> list[EvaluationReport]:
    """The run's evaluations, checkpoints by step, the final LoRA's last; a checkpoint's step is its file's."""
    names = (CHECKPOINT_REPORT.fullmatch(path.name) for path in run_dir.glob("evaluation-step*.json"))
    steps = sorted(int(match.group(1)) for match in names if match)
    reports = [report.model_copy(update={"step": step}) for step in steps if (report := read_report(run_dir, step))]
    final = read_report(run_dir)
    return reports + ([final] if final else [])
