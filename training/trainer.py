"""The LoRA training recipe for Stable Diffusion 1.x/2.x, SDXL and FLUX.

`Trainer` has four phases, called in order by `run_training()`:
setup (model, data, adapters, caches, optimizer; or state from a checkpoint),
train (the step loop), save_checkpoint, and cleanup (final state, files closed).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training.config import ConfigError, TrainingConfig
from training.data.dataset import DatasetError, class_image_records, hold_out, locate_dataset, scan_dataset
from training.data.loader import Batch, TrainingData
from training.export import export_lora
from training.lora import LoraFileError, attach_lora, load_lora_weights_into, lora_components, read_lora_file
from training.families.flux import QuantizationUnavailable
from training.models.loading import device_memory_gb, load_base_model, pick_device
from training.models.source import ModelNotFoundError, resolve_model
from training.optimizers import OptimizerUnavailable, build_lr_scheduler, build_optimizer
from training.placement import Placement, device_rng_state, restore_device_rng, text_encoders_stay_on_cpu
from training.prior import ensure_class_images
from training.resume import find_resume_lora, read_checkpoint_state, truncate_after
from training.run_evidence import EvidenceRecorder, SampleStatistics
from training.run_files import RunFiles, StatusWriter, default_run_dir
from training.sampling import render_samples
from training.validation import ValidationSet
from training.workspace import DIR_MODE, atomic_output, atomic_write_text, datasets_dir

log = logging.getLogger("training")

LOSS_SMOOTHING = 0.9  # EMA weight of the loss and step time shown in status.json
LOG_EVERY = 10  # steps between progress lines in train.log
# Errors whose message already says what is wrong and what to do: reported without a traceback.
EXPECTED_ERRORS = (
    ConfigError,
    DatasetError,
    ModelNotFoundError,
    OptimizerUnavailable,
    LoraFileError,
    QuantizationUnavailable,
)


class NonFiniteLoss(RuntimeError):
    pass


class RunAlreadyExists(RuntimeError):
    pass


@dataclass
class RunResult:
    state: str  # completed, stopped or failed
    run_dir: Path
    step: int
    lora_path: Path | None = None
    error: str | None = None


@dataclass(frozen=True)
class StepRecord:
    """What one optimizer step did, as its metrics row records it."""

    loss: float  # summed over the accumulated micro-batches, each scaled by 1 / accumulation: their mean
    grad_norm: float  # before clipping; inf when the fp16 gradient scaler skipped the step
    lr: float  # the learning rate the step used
    seconds: float
    files: list[str]  # the step's images


def _smoothed(average: float | None, value: float) -> float:
    """The exponential moving average shown in status.json (weight LOSS_SMOOTHING), or `value` at first."""
    return value if average is None else LOSS_SMOOTHING * average + (1 - LOSS_SMOOTHING) * value


class Trainer:
    def __init__(
        self, config: TrainingConfig, run_dir: Path | None = None, *, resume: bool = False, progress: bool = False
    ):
        self.config = config
        self.files = RunFiles(run_dir or default_run_dir(config.name))
        self.resume = resume
        self.progress = progress
        self.stop_requested = False
        self.step = 0
        self.started_at = time.time()
        self.status = StatusWriter(self.files.status)
        self._loss_ema: float | None = None
        self._step_time_ema: float | None = None

    def setup(self) -> None:
        """Load and prepare everything. The order matters:
        1. run directory, log and status first, so a watcher sees the run (and a setup error) at once;
        2. the model before the data: its native resolution and bucket step shape the buckets;
        3. the dataset before the resolved config: steps default to 100 x images;
        4. class images before the LoRA: they must show the base model's own idea of the class;
        5. latent/text caches before training, with the VAE and text encoder still frozen;
        6. a checkpoint's state last, since it overwrites adapters, optimizer, schedule and RNG.
        """
        self._open_run_directory()
        self.device = pick_device()
        self.device_memory_gb = device_memory_gb(self.device)  # also for the diagnostics' VRAM check
        self.status.update(device=self.device.type, device_memory_gb=self.device_memory_gb)
        config = self.config
        source = resolve_model(config.model_name, config.base_model_config)
        self.base = load_base_model(
            source,
            self.device,
            model_family=config.model_family,
            quantize=config.quantize_base,
            mixed_precision=config.mixed_precision,
            text_on_cpu=text_encoders_stay_on_cpu(config, self.device),
        )
        self.dataset = hold_out(
            scan_dataset(
                locate_dataset(config.dataset_path, datasets_dir()),
                trigger_word=config.trigger_word,
                trigger_words=config.trigger_words,
                instance_prompt=config.instance_prompt,
            ),
            config.validation_split,
            config.seed,
        )
        warnings = config.warnings() + self.dataset.warnings  # before resolve() folds network_* into rank/alpha
        self.config = config = config.resolve(
            native_resolution=self.base.native_resolution, num_images=self.dataset.num_images, family=self.base.family
        )
        self._check_against_model()
        atomic_write_text(self.files.config, config.to_yaml())
        self.status.update(total_steps=config.steps)
        for warning in warnings:
            log.warning("%s", warning)

        self.placement = Placement(self.base, config, self.device)
        records = list(self.dataset.images)
        if config.prior_preservation:
            class_dir = Path(config.class_data_dir) if config.class_data_dir else self.files.dir / "class_images"
            class_images = ensure_class_images(self.base, self.placement, config, class_dir)
            repeats = max(1, round(self.dataset.num_samples / max(1, len(class_images))))
            records += class_image_records(
                class_images, config.class_prompt, repeats=repeats, loss_weight=config.prior_loss_weight
            )

        attach_lora(
            self.base.lora_models,
            rank=config.rank,
            alpha=config.alpha,
            dropout=config.dropout,
            seed=config.seed,
            train_text_encoder=config.train_text_encoder,
            target_modules=config.target_modules,
        )
        if config.resume_from and not self.resume:
            lora_file = find_resume_lora(config.resume_from)
            log.info("starting from the LoRA %s", lora_file)
            weights = read_lora_file(lora_file, self.base.lora_models)
            for note in load_lora_weights_into(weights, self.base.lora_models):
                log.info("%s", note)
        self.placement.enable_memory_savers()

        self.data = TrainingData(records, self.base, config, self.files.latent_cache, self.files.text_cache)
        self.config = config = config.model_copy(update=self.data.build_caches(lambda p: self.status.update(phase=p)))
        atomic_write_text(self.files.config, config.to_yaml())  # now with where each cache went
        validation = ValidationSet(self.dataset.validation, self.base, config) if self.dataset.validation else None
        if validation is not None:
            validation.prepare()
        self.placement.offload_encoders()
        self.evidence = EvidenceRecorder(
            self.files, config, validation, lambda: lora_components(self.base.lora_models), self.base.family
        )
        self.objective = self.base.family_rules.objective(self.base, config)
        self.sample_stats = SampleStatistics([r.path for r in self.dataset.images])

        self.params = self._param_groups()
        self.optimizer = build_optimizer(config.optimizer, self.params, config.learning_rate)
        self.lr_scheduler = build_lr_scheduler(
            config.lr_scheduler,
            self.optimizer,
            warmup_steps=config.lr_warmup_steps,
            total_steps=config.steps,
            num_cycles=config.lr_scheduler_num_cycles,
        )
        self.noise_generator = torch.Generator(self.device).manual_seed(config.seed)
        self.trainable = [p for group in self.params for p in group["params"]]
        if self.resume:
            self._restore_latest_checkpoint()
        for line in self.describe():
            log.info("%s", line)

    # ------------------------------------------------------------------------------------------
    def train(self) -> None:
        """Optimizer steps until config.steps or a stop; after each, what is due at that step. Validation
        and samples come before the checkpoint and the stop check: pruning keeps the checkpoint their
        evidence recommends, and auto_stop_on reads both."""
        self._train_mode()
        self._notice_stop_request()  # one written while the model loaded
        if self.step == 0 and not self.stop_requested:
            self._validate()  # the baselines, before any training
            if self._sampling_on():
                self._render_samples()
        self.status.update(phase="training")
        steps = self.config.steps
        bar = tqdm(total=steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        while self.step < steps and not self.stop_requested:
            record = self._optimizer_step()
            self._record_step(record, bar)
            if self.evidence.due(self.step):
                self._validate()
            if self._samples_due():
                self._render_samples()
            if self._checkpoint_due():
                self.save_checkpoint()
            if self.evidence.due(self.step):
                self._stop_when_asked()
            self._notice_stop_request()
        bar.close()

    def _train_mode(self) -> None:
        self.base.denoiser.train()
        if self.config.train_text_encoder:
            for encoder in self.placement.text_encoders:
                encoder.train()

    def _optimizer_step(self) -> StepRecord:
        """One optimizer step over gradient_accumulation_steps micro-batches: forward, scaled backward,
        unscale, clip, step, zero_grad."""
        started = time.perf_counter()
        accumulation = self.config.gradient_accumulation_steps
        lr = self.lr_scheduler.get_last_lr()[0]
        loss_sum = torch.zeros((), device=self.device)
        files: list[str] = []
        for _ in range(accumulation):
            batch = self.data.next_batch()
            files += batch.files
            with self.placement.autocast():
                loss = self._loss(batch) / accumulation  # forward + loss
            self.placement.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        loss_value = loss_sum.item()  # one device sync per step
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(self._non_finite_message(loss_value, files))
        self.placement.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm or math.inf)
        self.placement.scaler.step(self.optimizer)
        self.placement.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepRecord(loss_value, float(grad_norm), lr, time.perf_counter() - started, files)

    def _loss(self, batch: Batch) -> torch.Tensor:
        """The denoising loss of one micro-batch: noise the latents at random noise levels and score
        the denoiser's prediction of what the family's objective asks (noise, velocity or flow)."""
        config, objective = self.config, self.objective
        latents = batch.latents  # (B, C, h, w)
        noise = torch.randn(latents.shape, generator=self.noise_generator, device=self.device)
        if config.noise_offset:
            # A per-image, per-channel shift teaches the model to change overall brightness.
            offset = torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), generator=self.noise_generator, device=self.device
            )
            noise = noise + config.noise_offset * offset
        levels = objective.sample_levels(latents, self.noise_generator)
        noisy, target = objective.noisy_and_target(latents, noise, levels)
        prediction = objective.predict(noisy, levels, batch, self.placement.weight_dtype)
        per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if config.min_snr_gamma:
            per_image = per_image * objective.min_snr_weights(levels, config.min_snr_gamma)
        return (per_image * batch.loss_weights).mean()

    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """LoRA (in the output format), optimizer, schedule, RNG and data position for step N,
        written into a hidden folder and renamed into place whole."""
        final = self.files.checkpoint(self.step)
        if final.exists():
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=self.files.checkpoints))
        try:
            self._export(staging / f"{self.config.name}-step{self.step:06d}.safetensors")
            with atomic_output(staging / "training_state.pt") as tmp:
                torch.save(self._training_state(), tmp)
            atomic_write_text(staging / "config.yaml", self.config.to_yaml())
            os.chmod(staging, DIR_MODE)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        recommended = self.evidence.recommended_checkpoint()
        self.files.prune_checkpoints(self.config.keep_last_n_checkpoints, also_keep=recommended)
        self.status.update(last_checkpoint=str(final))
        self.status.write()  # watchers learn of a new checkpoint at once, not at the next heartbeat
        log.info("saved checkpoint %s", final)
        return final

    def cleanup(self, result: RunResult) -> RunResult:
        fields = {"step": self.step}
        if result.lora_path:
            fields["lora_path"] = str(result.lora_path)
        if result.error:
            fields["error"] = result.error
        self.status.finish(result.state, **fields)
        self.files.clear_stop_request()  # it has been honoured, or came too late: a resumed run starts clean
        log.info("run %s at step %d: %s", result.state, self.step, result.error or self.files.dir)
        log.removeHandler(self._log_handler)
        self._log_handler.close()
        return result

    # ------------------------------------------------------------------------------------------
    def finish(self) -> RunResult:
        """After train(): a stopped run keeps a checkpoint to resume; a finished one exports its LoRA."""
        if self.stop_requested:
            if self.step > 0:
                self.save_checkpoint()
            return RunResult("stopped", self.files.dir, self.step)
        lora_path = self._export(self.files.lora(self.config.name))
        log.info("wrote %s", lora_path)
        return RunResult("completed", self.files.dir, self.step, lora_path=lora_path)

    def describe(self) -> list[str]:
        """The resolved run, printed at start-up."""
        config, data, dataset = self.config, self.data, self.dataset
        buckets = ", ".join(f"{w}x{h}: {n}" for (w, h), n in data.batches.bucket_sizes().items())
        concepts = ", ".join(
            f"{c.folder or '(root)'} x{c.repeats} -> {c.trigger_word or '-'} ({c.num_images})" for c in dataset.concepts
        )
        per_epoch = data.batches.batches_per_epoch
        epochs = self._planned_epochs()
        denoiser_params = sum(p.numel() for p in self.params[0]["params"])
        te_params = sum(p.numel() for g in self.params[1:] for p in g["params"])
        extra = len(data.records) - len(dataset.images)
        return [
            f"model: {config.model_name} ({self.base.family}, {self.base.prediction_type}, "
            f"native {self.base.native_resolution}px) on {self.device}"
            + (f" ({self.device_memory_gb:g} GB)" if self.device_memory_gb else ""),
            f"images: {dataset.num_images} ({dataset.num_samples} per epoch with repeats), "
            f"{len(dataset.validation)} held out for validation" + (f", {extra} class images" if extra else ""),
            f"concepts: {concepts}",
            f"buckets (samples): {buckets}",
            f"batch: {config.batch_size} x {config.gradient_accumulation_steps} accumulation = "
            f"{config.effective_batch_size} effective",
            f"steps: {config.steps} ({epochs:.1f} epochs of {per_epoch} batches)",
            f"trainable parameters: {denoiser_params + te_params:,} ({self.base.denoiser_prefix} "
            f"{denoiser_params:,}, text encoder {te_params:,}); "
            f"rank {config.rank}, alpha {config.alpha:g}",
            f"optimizer: {config.optimizer} lr {config.learning_rate:g}, {config.lr_scheduler} schedule, "
            f"{config.lr_warmup_steps} warm-up steps; precision {self.placement.label}{self._quantization_note()}",
            f"run directory: {self.files.dir}",
        ]

    # --- bookkeeping ---------------------------------------------------------------------------
    def _record_step(self, record: StepRecord, bar: tqdm) -> None:
        """The step's metrics row, the smoothed loss and speed in the status, the progress bar and log."""
        config = self.config
        self.files.append_metric(
            {
                "step": self.step,
                "loss": record.loss,
                "lr": record.lr,
                # fp16 steps that the gradient scaler skips have an infinite norm; JSON has no inf.
                "grad_norm": record.grad_norm if math.isfinite(record.grad_norm) else None,
                "step_time": record.seconds,
                "time": time.time(),
                "files": [self._dataset_name(f) for f in record.files],  # a loss spike points at its images
            }
        )
        self._loss_ema = _smoothed(self._loss_ema, record.loss)
        self._step_time_ema = _smoothed(self._step_time_ema, record.seconds)
        self.status.update(
            step=self.step,
            epoch=self.data.epoch + 1,
            loss=self._loss_ema,
            lr=record.lr,
            it_per_s=1.0 / self._step_time_ema if self._step_time_ema > 0 else None,
            eta_s=(config.steps - self.step) * self._step_time_ema,
        )
        bar.set_postfix(loss=f"{self._loss_ema:.4f}", lr=f"{record.lr:.2e}", refresh=False)
        bar.update(1)
        if self.step % LOG_EVERY == 0 or self.step == config.steps:
            progress = (self.step, config.steps, self._loss_ema, record.lr, record.grad_norm)
            log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3g", *progress)

    def _validate(self) -> None:
        """The held-out images' validation loss (when there are any) and the LoRA's update size, as
        metrics rows; with the smoothed training loss so far, for the gap between the two."""
        self.evidence.record(self.step, self.placement, self._loss_ema)

    def _samples_due(self) -> bool:
        return self._sampling_on() and self.step % self.config.sample_every == 0

    def _checkpoint_due(self) -> bool:
        """Every save_every steps; the last step writes the final LoRA instead."""
        return self.step % self.config.save_every == 0 and self.step < self.config.steps

    def _notice_stop_request(self) -> None:
        """The stop every platform has (RunFiles.request_stop): one stat per step of tens of milliseconds or more."""
        if not self.stop_requested and self.files.stop_requested():
            log.info("stop requested (%s): stopping after this step", self.files.stop_request.name)
            self.stop_requested = True

    def _stop_when_asked(self) -> None:
        """auto_stop_on: the run ends after this step when its evidence meets one of the conditions."""
        if reason := self.evidence.stop_reason():
            log.warning("%s", reason)
            self.status.update(stop_reason=reason)
            self.stop_requested = True

    def _render_samples(self) -> None:
        with self.placement.encoders_on_device():
            names = render_samples(self.base, self.placement, self.config, self.files, self.step, self.sample_stats)
        self.status.update(latest_samples=names)
        self.status.write()

    def _sampling_on(self) -> bool:
        return bool(self.config.test_prompts) and not self.config.disable_sampling

    def _export(self, path: Path) -> Path:
        return export_lora(
            path,
            self.base,
            self.config,
            dataset=self.dataset,
            step=self.step,
            epoch=self.data.epoch + 1,
            num_epochs=math.ceil(self._planned_epochs()),
            started_at=self.started_at,
        )

    def _quantization_note(self) -> str:
        if not self.base.quantized:
            return ""
        method = self.base.denoiser.hf_quantizer.quantization_config.quant_method  # bitsandbytes or torchao
        return f", frozen {self.base.denoiser_prefix} weights in 8 bits ({getattr(method, 'value', method)})"

    def _dataset_name(self, file: str) -> str:
        path = Path(file)
        return str(path.relative_to(self.dataset.root)) if path.is_relative_to(self.dataset.root) else path.name

    def _planned_epochs(self) -> float:
        micro_batches = self.config.steps * self.config.gradient_accumulation_steps
        return micro_batches / max(1, self.data.batches.batches_per_epoch)

    def _non_finite_message(self, loss: float, files: list[str]) -> str:
        checkpoints = self.files.list_checkpoints()
        kept = f"the last good checkpoint is {checkpoints[-1][1]}" if checkpoints else "no checkpoint was saved yet"
        return (
            f"the loss became {loss} at step {self.step + 1} (batch: {', '.join(Path(f).name for f in files)}); "
            f"lower learning_rate (now {self.config.learning_rate:g}), keep max_grad_norm on, "
            f"or check those images; {kept}"
        )

    def _training_state(self) -> dict:
        return {
            "step": self.step,
            "data": self.data.state(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.placement.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            **device_rng_state(self.device),
            "noise_rng": self.noise_generator.get_state(),
            "loss_ema": self._loss_ema,
        }

    def _restore_latest_checkpoint(self) -> None:
        checkpoints = self.files.list_checkpoints()
        if not checkpoints:
            log.info("no checkpoint in %s yet: starting from step 0", self.files.dir)
            truncate_after(self.files, -1)
            return
        step, folder = checkpoints[-1]
        lora_file, state = read_checkpoint_state(folder)
        load_lora_weights_into(read_lora_file(lora_file, self.base.lora_models), self.base.lora_models)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.placement.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        restore_device_rng(self.device, state)
        self.noise_generator.set_state(state["noise_rng"])
        self.data.restore(state["data"])
        self.step = state["step"]
        self._loss_ema = state["loss_ema"]
        truncate_after(self.files, step)
        self.status.update(step=step, last_checkpoint=str(folder))
        log.info("resumed from %s at step %d", folder, step)

    def _open_run_directory(self) -> None:
        has_run = self.files.status.exists() or self.files.list_checkpoints()
        if has_run and not self.resume:
            raise RunAlreadyExists(
                f"{self.files.dir} already holds a run: continue it with --resume, or choose another --run-dir"
            )
        self.files.create()
        partial = self.files.remove_partial_writes() if self.resume else []
        handler = logging.FileHandler(self.files.log, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self._log_handler = handler
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        self.status.start()
        if partial:
            log.info("removed %d partial write(s) of the previous process", len(partial))

    def _check_against_model(self) -> None:
        config, layers = self.config, self.base.text_encoder.config.num_hidden_layers
        errors, warnings = config.family_conflicts(self.base.family)
        if errors:
            raise ConfigError(errors)
        for warning in warnings:
            log.warning("%s", warning)
        if config.clip_skip > layers:
            raise ConfigError(
                [f"clip_skip = {config.clip_skip}: the text encoder has only {layers} layers (allowed: 1-{layers})"]
            )
        if config.resolution < self.base.native_resolution:
            log.info(
                "training at %dpx, below the model's native %dpx (fine for speed; the guide advises not always "
                "training at full resolution)",
                config.resolution,
                self.base.native_resolution,
            )

    # --- parameters ----------------------------------------------------------------------------
    def _param_groups(self) -> list[dict]:
        from diffusers.training_utils import cast_training_params

        encoders = self.placement.text_encoders if self.config.train_text_encoder else []
        denoiser = self.base.denoiser
        cast_training_params([denoiser, *encoders], dtype=torch.float32)
        groups = [{"params": [p for p in denoiser.parameters() if p.requires_grad], "lr": self.config.learning_rate}]
        if encoders:
            groups.append(
                {
                    "params": [p for encoder in encoders for p in encoder.parameters() if p.requires_grad],
                    "lr": self.config.text_encoder_lr or self.config.learning_rate,
                }
            )
        return groups


def run_training(
    config: TrainingConfig, run_dir: Path | None = None, *, resume: bool = False, progress: bool = False
) -> RunResult:
    """The one entry point: setup, train, save, cleanup; a stop request (file or signal) stops with a checkpoint."""
    trainer = Trainer(config, run_dir, resume=resume, progress=progress)
    previous = _install_stop_handlers(trainer)
    try:
        trainer.setup()
        trainer.train()
        result = trainer.finish()
    except RunAlreadyExists:
        raise  # the directory belongs to another run: write nothing into it
    except EXPECTED_ERRORS + (NonFiniteLoss,) as exc:
        result = RunResult("failed", trainer.files.dir, trainer.step, error=str(exc))
    except KeyboardInterrupt:
        result = RunResult("stopped", trainer.files.dir, trainer.step, error="interrupted twice: no final checkpoint")
    except Exception as exc:
        log.exception("training failed")
        result = RunResult("failed", trainer.files.dir, trainer.step, error=f"{type(exc).__name__}: {exc}")
    finally:
        _restore_handlers(previous)
    return trainer.cleanup(result)


def _install_stop_handlers(trainer: Trainer) -> dict:
    """First SIGINT/SIGTERM: finish the step, save a checkpoint, end 'stopped' (as the stop-request file does). A
    second signal interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    signals = []  # only a second signal interrupts: the server writes the stop file just before its SIGTERM

    def request_stop(signum, frame):
        if signals:
            raise KeyboardInterrupt
        signals.append(signum)
        trainer.stop_requested = True
        log.info("%s received: stopping after this step", signal.Signals(signum).name)

    return {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
