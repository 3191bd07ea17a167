"""TensorBoard and Weights & Biases logging of a run (the config's `log_with`), by the main process only.

The trainer makes one call per event: an optimizer step, a validation, a set of samples, the end. The charts
carry the same names in both (TensorBoard and W&B each group a chart with those of its prefix): loss/train,
loss/smoothed (the 0.9 EMA of status.json), loss/validation, learning_rate, grad_norm, and one image series per
prompt, samples/prompt_<i> and samples/control.

Both are optional extras, asked for with importlib.util.find_spec, which finds a package without importing it:
validate-training-config asks in the server (which must not import them: torch.utils.tensorboard imports torch),
and the trainer asks again before it loads the model.

TensorBoard is written with torch.utils.tensorboard's SummaryWriter rather than tensorboardX: torch is installed
already, and its writer needs only the tensorboard package, which a user wants anyway for `tensorboard --logdir`
(and the tests for its reader); tensorboardX would be one more package writing the same event files.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from training.config_errors import ConfigError
from training.workspace import atomic_write_text, read_jsonl

if TYPE_CHECKING:
    from training.config import TrainingConfig
    from training.run_files import RunFiles

LOSS, SMOOTHED_LOSS, VALIDATION_LOSS = "loss/train", "loss/smoothed", "loss/validation"
LEARNING_RATE, GRAD_NORM = "learning_rate", "grad_norm"
# The SummaryWriter's default, 120 s, would leave a live TensorBoard two minutes behind the run; a flush
# every 10 s is one small write.
FLUSH_SECONDS = 10
WANDB_RUN_ID_FILE = "wandb-run-id"  # in the run folder: the W&B run a resumed run continues


class LoggerUnavailable(RuntimeError):
    """An installed logger that did not start (W&B online without a login), with what to do."""


def missing_loggers(log_with: Iterable[str]) -> list[str]:
    """One problem per logger of `log_with` whose package is not installed here (the package, the module and
    the project's extra all have the logger's name), with the command that installs it."""
    return [
        f'log_with {name}: the {name} package is not installed: pip install "lora-mcp[{name}]" (or pip install '
        f"{name}), or remove {name} from log_with"
        for name in dict.fromkeys(log_with)
        if importlib.util.find_spec(name) is None
    ]


class RunLoggers:
    """The run's loggers; none on any process but the main one (`main`), so each event is logged once."""

    def __init__(self, config: TrainingConfig, files: RunFiles, *, main: bool):
        self._config = config
        self._files = files
        self._tensorboard_on = main and "tensorboard" in config.log_with
        self._wandb_on = main and "wandb" in config.log_with
        self._board = None  # torch's SummaryWriter, opened at the first event (see _writer)
        self._wandb = None  # the W&B run

    def open(self) -> None:
        """Refuse a logger that is not installed (every process: they share an environment) and start W&B."""
        if missing := missing_loggers(self._config.log_with):
            raise ConfigError(missing)
        if self._wandb_on:
            self._wandb = _start_wandb(self._config, self._files)

    def step(self, step: int, *, loss: float, smoothed: float, lr: float, grad_norm: float) -> None:
        values = {LOSS: loss, SMOOTHED_LOSS: smoothed, LEARNING_RATE: lr}
        if math.isfinite(grad_norm):  # infinite where the fp16 gradient scaler skipped the step: no point
            values[GRAD_NORM] = grad_norm
        self._scalars(step, values)

    def validation(self, step: int, loss: float | None) -> None:
        """The held-out images' loss (None: the run holds none out)."""
        if loss is not None:
            self._scalars(step, {VALIDATION_LOSS: loss})

    def samples(self, step: int) -> None:
        """The sample images rendered at `step`, as samples/index.jsonl lists them (with their prompts)."""
        if not (self._tensorboard_on or self._wandb_on):
            return
        import numpy as np

        from training.image_files import upright_image

        rows = {row["prompt_index"]: row for row in read_jsonl(self._files.samples_index) if row["step"] == step}
        images = {}
        for index, row in sorted(rows.items()):
            tag = "samples/control" if row["control"] else f"samples/prompt_{index}"
            with upright_image(self._files.samples / row["file"]) as opened:
                image = opened.convert("RGB")
            if self._tensorboard_on:
                self._writer(step).add_image(tag, np.asarray(image), step, dataformats="HWC")
            if self._wandb is not None:
                import wandb

                images[tag] = wandb.Image(image, caption=row["prompt"])
        if self._board is not None:
            self._board.flush()  # images are what a viewer waits for
        if images:
            self._wandb.log(images, step=step)

    def close(self, failed: bool) -> None:
        if self._board is not None:
            self._board.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        if self._tensorboard_on:
            writer = self._writer(step)
            for tag, value in values.items():
                writer.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def _writer(self, step: int) -> Any:
        """The SummaryWriter, opened at the run's first event. purge_step: a resumed run's first event comes
        after its checkpoint, and TensorBoard then drops what the previous process logged past that step
        (the run's metrics.jsonl drops those rows too), so no step shows twice."""
        if self._board is None:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(self._files.tensorboard), purge_step=step, flush_secs=FLUSH_SECONDS)
        return self._board


def _start_wandb(config: TrainingConfig, files: RunFiles) -> Any:
    """A W&B run named after the run folder in the project named after the config, its files under the run
    folder (wandb/); wandb itself reads WANDB_MODE (offline: nothing leaves the machine until `wandb sync`),
    WANDB_API_KEY and WANDB_ENTITY. Its console capture is off: train.log is the run's log.

    The W&B run's id is kept in the run folder (WANDB_RUN_ID_FILE), so a resumed run (resume-training,
    `lora-train --resume`) continues the same W&B run rather than starting a second one beside it. W&B keeps a
    run's steps increasing: the steps a stopped process logged past its last checkpoint, trained again after
    the resume, keep their first values there (metrics.jsonl and TensorBoard keep the new ones)."""
    import wandb

    id_file = files.dir / WANDB_RUN_ID_FILE
    run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else None  # None: W&B picks one
    try:
        run = wandb.init(
            project=config.name,
            name=files.dir.name,
            dir=str(files.dir),
            id=run_id,
            resume="allow",
            config=config.model_dump(mode="json", exclude_none=True),
            settings=wandb.Settings(console="off", quiet=True),
        )
    except Exception as exc:  # wandb raises its own types (UsageError, CommError, ...), all with a message
        raise LoggerUnavailable(
            f"log_with wandb: W&B did not start ({exc}): log in with `wandb login` (or set WANDB_API_KEY), set "
            "WANDB_MODE=offline to keep the run on disk (upload it later with `wandb sync`), or remove wandb from "
            "log_with"
        ) from exc
    atomic_write_text(id_file, run.id)
    return run
