"""Continuing training: a run's own checkpoints (exact resume) and `resume_from` (a previous
run's LoRA as the starting point of a new run; training.resume_source finds it)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from training.config_errors import ConfigError
from training.lora import LoraFileError, load_lora_weights_into, read_lora_file
from training.placement import device_rng_state, restore_device_rng
from training.resume_source import checkpoint_lora
from training.run_files import RunFiles
from training.workspace import atomic_write_text

if TYPE_CHECKING:
    from training.trainer import Trainer

log = logging.getLogger("training")


def read_checkpoint_state(folder: Path, map_location: str | None = None) -> tuple[Path, dict]:
    """The LoRA file and training state of a checkpoint folder."""
    lora = checkpoint_lora(folder)
    if lora is None:
        raise LoraFileError(f"checkpoint {folder} is incomplete (needs one .safetensors and training_state.pt)")
    return lora, torch.load(folder / "training_state.pt", map_location=map_location, weights_only=True)


def truncate_after(files: RunFiles, step: int) -> None:
    """Drop metric and sample rows past `step`: they belong to an attempt that is being redone,
    and the redone steps will write them again."""
    for path in (files.metrics, files.samples_index):
        if not path.exists():
            continue
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed process
            if row.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def training_state(trainer: Trainer) -> dict:
    """What a checkpoint's training_state.pt holds besides the LoRA: everything an exact resume needs."""
    return {
        "step": trainer.step,
        "data": trainer.data.state(),
        "optimizer": trainer.optimizer.state_dict(),
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
        "scaler": trainer.placement.scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        **device_rng_state(trainer.device),
        "noise_rng": trainer.noise_generator.get_state(),
        "loss_ema": trainer.loss_ema,
        "images": trainer.dataset.num_images,  # a resume refuses a dataset that has since gained or lost images
    }


def restore_latest_checkpoint(trainer: Trainer) -> None:
    """The state of the run directory's latest checkpoint, into `trainer` (after its setup). With several
    processes the main one reads it and sends it to all: the other machines' run directories hold no checkpoint."""
    found = _latest_checkpoint(trainer) if trainer.dist.is_main else None
    folder, lora, state = trainer.dist.broadcast(found) or (trainer.files.dir, None, None)
    if state is None:
        log.info("no checkpoint in %s yet: starting from step 0", folder)
        if trainer.dist.is_main:
            truncate_after(trainer.files, -1)
        return
    state = trainer.dist.own_state(state)
    if state.get("images", trainer.dataset.num_images) != trainer.dataset.num_images:  # older checkpoints: no count
        raise ConfigError(
            [
                f"the dataset {trainer.config.dataset_path} now has {trainer.dataset.num_images} training images but "
                f"checkpoint {folder.name} was trained on {state['images']} (its data position counts those): "
                "restore the dataset to resume, or start a new run with resume_from: " + str(folder)
            ]
        )
    load_lora_weights_into(lora, trainer.base.lora_models)
    _restore_optimizer(trainer, state)
    torch.set_rng_state(state["torch_rng"])
    restore_device_rng(trainer.device, state)
    trainer.noise_generator.set_state(state["noise_rng"])
    trainer.data.restore(state["data"])
    trainer.step = state["step"]
    trainer.loss_ema = state["loss_ema"]
    if trainer.dist.is_main:  # the run's files are the main process's
        truncate_after(trainer.files, trainer.step)
    trainer.status.update(step=trainer.step, last_checkpoint=str(folder))
    log.info("resumed from %s at step %d", folder, trainer.step)


def _restore_optimizer(trainer: Trainer, state: dict) -> None:
    """The optimizer, its schedule and the fp16 gradient scaler, as far as the config still matches the checkpoint's.
    A fix applied on resume (resume-training apply_fix) may change the optimizer (its state then starts afresh:
    AdamW's moments mean nothing to Adafactor), the precision (a new fp16 scaler starts at its default scale) or the
    learning rate (the schedule goes on from its position, at the new rate); a new batch size moves the data position
    to the same share of its epoch (TrainingData.restore). Such a resume continues the run but is no longer exact: it
    does not give the steps an unbroken run with the new config would have. Unchanged, all is restored as saved."""
    optimizer, schedule = trainer.optimizer, trainer.lr_scheduler
    rates = [group["initial_lr"] for group in optimizer.param_groups]  # this config's, before the checkpoint's
    saved = state["optimizer"]["param_groups"]
    if len(saved) == len(optimizer.param_groups) and set(saved[0]) == set(optimizer.param_groups[0]):
        optimizer.load_state_dict(state["optimizer"])
    else:
        log.warning("the optimizer is not the checkpoint's (a fix changed it): its state starts afresh")
    schedule.load_state_dict(state["lr_scheduler"])
    # new / old is exactly 1.0 where the rate is unchanged: the resume stays bit-identical
    lrs = [lr * (new / old) for lr, new, old in zip(schedule.get_last_lr(), rates, schedule.base_lrs)]
    schedule.base_lrs, schedule._last_lr = rates, lrs
    for group, rate, lr in zip(optimizer.param_groups, rates, lrs):
        group["initial_lr"], group["lr"] = rate, lr
    if state["scaler"]:  # empty when the checkpoint trained without fp16's scaler
        trainer.placement.scaler.load_state_dict(state["scaler"])


def _latest_checkpoint(trainer: Trainer) -> tuple[Path, dict, dict] | None:
    """The latest checkpoint's folder, LoRA weights and training state (on the CPU, so that it can be sent to
    the other processes); None when there is none."""
    checkpoints = trainer.files.list_checkpoints()
    if not checkpoints:
        return None
    folder = checkpoints[-1][1]
    lora_file, state = read_checkpoint_state(folder, map_location="cpu" if trainer.dist.multi else None)
    return folder, read_lora_file(lora_file, trainer.base.lora_models), state
