"""Failures in the middle of a run's steps, told so that the user can act on them: a loss that became NaN or
infinite, and the device running out of memory. Each message names the step, what is kept to resume from, and
what to change; diagnose-training reads them back (training/diagnostics: non-finite-loss, out-of-memory)."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from training.trainer import Trainer

log = logging.getLogger("training")


class NonFiniteLoss(RuntimeError):
    pass


def _kept(trainer: Trainer) -> str:
    checkpoints = trainer.files.list_checkpoints()
    return f"the last good checkpoint is {checkpoints[-1][1]}" if checkpoints else "no checkpoint was saved yet"


def non_finite_message(trainer: Trainer, loss: float, files: list[str]) -> str:
    return (
        f"the loss became {loss} at step {trainer.step + 1} (batch: {', '.join(Path(f).name for f in files)}); "
        f"lower learning_rate (now {trainer.config.learning_rate:g}), keep max_grad_norm on, "
        f"or check those images; {_kept(trainer)}"
    )


def out_of_memory_failure(trainer: Trainer, error: str) -> str:
    """After torch's out-of-memory error (called once the error and the frames of the failed step are gone, so
    their tensors are freed): the gradients dropped and the allocator's cache emptied, a checkpoint of the last
    whole step saved where the weights are whole, and the failure as one line with the fix."""
    from training.diagnostics.memory_rules import LOADING, describe_patch, out_of_memory_patch

    if hasattr(trainer, "optimizer"):  # not there when setup ran out of memory
        trainer.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    saved = _save(trainer)
    config = trainer.config
    patch = out_of_memory_patch(config, trainer.base.family_rules) if hasattr(trainer, "base") else {}
    fix = f"with less memory ({describe_patch(patch)})" if patch else "on a GPU with more memory"
    memory = f" ({trainer.device_memory_gb:.1f} GB)" if getattr(trainer, "device_memory_gb", None) else ""
    # setup() makes the optimizer last, after the model and its caches are on the device
    where = f"at step {trainer.step + 1}" if hasattr(trainer, "optimizer") else LOADING
    return (
        f"ran out of device memory{memory} {where}: {error.splitlines()[0] if error else ''}; "
        f"{saved}; continue it {fix}: resume-training with apply_fix out-of-memory (diagnose-training's finding)"
    )


def _save(trainer: Trainer) -> str:
    """A checkpoint at the last whole step, when there is one to write: not before step 1, not when the error
    came while the optimizer was changing the weights (half updated), not with several processes (a checkpoint
    is a collective, and the others are failing too). Saving may itself fail (out of memory again, a full disk):
    then say so, and the run still ends `failed` with its reason (save_checkpoint stages its folder and renames it,
    so a failed save leaves no half-written checkpoint). The checkpoint's data position is where the failed step
    began, so the resumed run learns that step's images; its random streams are not rewound (other noise)."""
    done = trainer.step > 0 and trainer.updating_to != trainer.step + 1 and not trainer.dist.multi
    if not done or trainer.files.checkpoint(trainer.step).exists():
        return _kept(trainer)
    if trainer.data_before_step is not None:  # the failed step's batches were drawn but not learnt: draw them again
        trainer.data.restore(trainer.data_before_step)
    try:
        folder = trainer.save_checkpoint()
    except Exception:  # anything escaping here would skip run_training's cleanup: no final status, no reason
        log.exception("the checkpoint after running out of memory could not be saved")
        return f"saving a checkpoint failed too; {_kept(trainer)}"
    return f"saved checkpoint {folder} (step {trainer.step}) to resume from"
