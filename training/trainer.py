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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training.config import ConfigError, TrainingConfig
from training.data.dataset import DatasetError, ImageRecord, class_image_records, hold_out, locate_dataset, scan_dataset
from training.data.loader import Batch, TrainingData
from training.distributed import Distributed, PeerLost
from training.export import export_lora
from training.lora import LoraFileError, attach_lora, load_lora_weights_into, lora_components, read_lora_file
from training.families.flux import QuantizationUnavailable
from training.memory_watch import MemoryWatch, memory_in_use_gb
from training.models.loading import device_memory_gb, load_base_model, pick_device
from training.models.source import ModelNotFoundError, resolve_model
from training.optimizers import OptimizerUnavailable, build_lr_scheduler, build_optimizer
from training.placement import Placement, native_bf16, text_encoders_stay_on_cpu
from training.prior import ensure_class_images
from training.published_loras import publish_final_lora
from training.resume import restore_latest_checkpoint, training_state
from training.resume_source import ResumeSourceError, find_resume_lora, resume_conflicts
from training.run_config import resolve_run_config
from training.run_evidence import EvidenceRecorder, SampleStatistics
from training.run_loggers import LoggerUnavailable, RunLoggers
from training.run_summary import describe_run
from training.run_files import RunAlreadyExists, RunFiles, StatusWriter, default_run_dir, smoothed
from training.sampling import render_samples
from training.step_failures import NonFiniteLoss, non_finite_message, out_of_memory_failure
from training.stop_signals import stop_on_signals
from training.validation import ValidationSet
from training.workspace import DIR_MODE, atomic_output, atomic_write_text, datasets_dir, loras_dir

log = logging.getLogger("training")

LOG_EVERY = 10  # steps between progress lines in train.log
# Errors whose message already says what is wrong and what to do: reported without a traceback.
EXPECTED_ERRORS = (
    ConfigError,
    DatasetError,
    ModelNotFoundError,
    OptimizerUnavailable,
    LoraFileError,
    ResumeSourceError,
    QuantizationUnavailable,
    LoggerUnavailable,
)


@dataclass
class RunResult:
    state: str  # completed, stopped or failed
    run_dir: Path
    step: int
    lora_path: Path | None = None
    exported_lora: str | None = None  # its name in loras/ (training/published_loras.py)
    error: str | None = None


@dataclass(frozen=True)
class StepRecord:
    """What one optimizer step did, as its metrics row records it."""

    loss: float  # summed over the accumulated micro-batches, each scaled by 1 / accumulation: their mean
    grad_norm: float  # before clipping; inf when the fp16 gradient scaler skipped the step
    lr: float  # the learning rate the step used
    seconds: float
    files: list[str]  # the step's images


class Trainer:
    def __init__(
        self,
        config: TrainingConfig,
        run_dir: Path | None = None,
        *,
        resume: bool = False,
        progress: bool = False,
        dist: Distributed | None = None,
    ):
        self.config = config
        self.dist = dist or Distributed.single()  # only the main process writes the run's files
        self.files = RunFiles(run_dir or default_run_dir(config.name))
        self.resume = resume
        self.progress = progress
        self.stop_requested = False  # agreed by every process: only this ends the loop and decides finish()
        self._stop_wanted = False  # this process's own wish (signal, stop file, auto_stop_on), not yet agreed
        self.step = 0
        self.started_at = time.time()
        self.status = StatusWriter(self.files.status)
        self.loggers = RunLoggers(config, self.files, main=self.dist.is_main)  # log_with
        self.loss_ema: float | None = None
        self._step_time_ema: float | None = None
        self.updating_to = 0  # the step the optimizer is writing into the weights: until it is done, they are half new
        self.data_before_step: dict | None = None  # where the step under way began drawing: a rescue checkpoint's position

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
        if self.resume and (changed := resume_conflicts(self.config, self.files.dir)):
            raise ConfigError(changed)  # before the model loads: the checkpoint cannot continue under this config
        self.loggers.open()  # a logger that is not installed fails the run before the model loads
        self._open_device()
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
        self.config, warnings = resolve_run_config(config, self.base, self.dataset)
        config = self.config
        self._write_config()
        self.status.update(total_steps=config.steps)
        for warning in warnings if self.dist.is_main else ():
            log.warning("%s", warning)

        self.placement = Placement(self.base, config, self.device)
        records = list(self.dataset.images) + self._class_image_records()
        self._attach_lora()
        self.placement.enable_memory_savers()

        self.data = TrainingData(records, self.base, config, self.files.latent_cache, self.files.text_cache, self.dist)
        self.config = config = config.model_copy(update=self.data.build_caches(lambda p: self.status.update(phase=p)))
        self._write_config()  # now with where each cache went
        self.validation = validation = (
            ValidationSet(self.dataset.validation, self.base, config, self.dist) if self.dataset.validation else None
        )
        if validation is not None:
            validation.prepare()
        self.placement.release_text_encoders()
        self.placement.offload_encoders()
        self.evidence = EvidenceRecorder(
            self.files, config, validation, lambda: lora_components(self.base.lora_models), self.base.family
        )
        self.objective = self.base.family_rules.objective(self.base, config)
        self.sample_stats = SampleStatistics([r.path for r in self.dataset.images])

        self._build_optimizer()
        self.noise_generator = torch.Generator(self.device).manual_seed(config.seed)
        if self.resume:
            restore_latest_checkpoint(self)
        for line in describe_run(self) if self.dist.is_main else ():
            log.info("%s", line)

    def _open_device(self) -> None:
        """The device, its memory (for the status and the diagnostics' VRAM check) and the watch for a spill
        into shared memory (auto_stop_on memory_spill)."""
        self.device = self.dist.device or pick_device()
        self.device_memory_gb = device_memory_gb(self.device)
        self.status.update(
            device=self.device.type, device_memory_gb=self.device_memory_gb, bf16_native=native_bf16(self.device)
        )
        stops = "memory_spill" in self.config.auto_stop_on
        self.memory = MemoryWatch(lambda: memory_in_use_gb(self.device), self.device_memory_gb, stops, self.status)
        if self.dist.multi:
            self.status.update(processes=self.dist.processes(self.device))

    def _class_image_records(self) -> list[ImageRecord]:
        """Prior preservation's class images, repeated to about as many samples as the dataset's own; none
        without it. The dataset's class/ images are read, never written: the missing ones are rendered into the
        run, with the base model before the LoRA is attached (setup step 4)."""
        config = self.config
        if not config.prior_preservation:
            return []
        given = [] if config.class_data_dir else self.dataset.class_images
        class_dir = Path(config.class_data_dir or self.files.dir / "class_images")
        with self.dist.local_main_first():  # it renders the machine's class images, the others find them
            class_images = ensure_class_images(self.base, self.placement, config, class_dir, given)
        repeats = max(1, round(self.dataset.num_samples / max(1, len(class_images))))
        return class_image_records(
            class_images, config.class_prompt, repeats=repeats, loss_weight=config.prior_loss_weight
        )

    def _attach_lora(self) -> None:
        """The LoRA's layers; a new run with `resume_from` starts from that LoRA's weights (a resumed run's
        weights come from its checkpoint, setup step 6)."""
        config = self.config
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

    def _build_optimizer(self) -> None:
        config = self.config
        self.params = self._param_groups()
        self.trainable = [p for group in self.params for p in group["params"]]
        self.optimizer = build_optimizer(config.optimizer, self.params, config.learning_rate)
        self.lr_scheduler = build_lr_scheduler(
            config.lr_scheduler,
            self.optimizer,
            warmup_steps=config.lr_warmup_steps,
            total_steps=config.steps,
            num_cycles=config.lr_scheduler_num_cycles,
        )

    def _write_config(self) -> None:
        if self.dist.is_local_main:  # every machine's, so that `--resume` works there too
            atomic_write_text(self.files.config, self.config.to_yaml())

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
            if self.dist.is_main:
                self._record_step(record, bar)
            if self.evidence.due(self.step):
                self._validate()
            if self._samples_due():
                self._render_samples()
            if self._checkpoint_due():
                self.save_checkpoint()
            if self.evidence.due(self.step):
                self._stop_when_asked()
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
        self.data_before_step = self.data.state()
        for _ in range(accumulation):
            batch = self.data.next_batch()
            files += batch.files
            with self.placement.autocast():
                loss = self._loss(batch)  # forward + loss
            if loss is None:  # no samples for this process in this micro-batch
                continue
            loss = loss / accumulation
            self.placement.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        # one device sync per step; with several processes, one all-reduce of the LoRA's gradients and loss,
        # before unscale_: an fp16 overflow on one process makes every process skip the step
        # that all-reduce also carries the stop wish of each process, so all stop after the same step
        loss_value, self.stop_requested = self.dist.sum_gradients(self.trainable, loss_sum, self._wants_stop())
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(non_finite_message(self, loss_value, files))
        self.placement.scaler.unscale_(self.optimizer)
        self.updating_to = self.step + 1
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm or math.inf)
        self.placement.scaler.step(self.optimizer)
        self.placement.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepRecord(loss_value, float(grad_norm), lr, time.perf_counter() - started, files)

    def _loss(self, batch: Batch) -> torch.Tensor | None:
        """The denoising loss of one micro-batch: noise the latents at random noise levels and score
        the denoiser's prediction of what the family's objective asks (noise, velocity or flow). With
        several processes, the noise and levels are drawn for the global batch (the generator is the same
        on every process) and sliced, as one process with the whole batch would draw them; the loss is then
        this process's share of the global batch's mean (None when it has no samples)."""
        config, objective = self.config, self.objective
        latents = batch.latents  # (B, C, h, w)
        total = batch.global_size or latents.shape[0]
        shape = (total, *latents.shape[1:])
        noise = torch.randn(shape, generator=self.noise_generator, device=self.device)
        if config.noise_offset:
            # A per-image, per-channel shift teaches the model to change overall brightness.
            offset = torch.randn((total, shape[1], 1, 1), generator=self.noise_generator, device=self.device)
            noise = noise + config.noise_offset * offset
        levels = objective.sample_levels(noise, self.noise_generator)  # it reads only the shape and device
        if batch.global_size is not None:
            mine = slice(batch.first, batch.first + latents.shape[0])
            noise, levels = noise[mine], levels[mine]
            if latents.shape[0] == 0:
                return None
        noisy, target = objective.noisy_and_target(latents, noise, levels)
        prediction = objective.predict(noisy, levels, batch, self.placement.weight_dtype)
        per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if config.min_snr_gamma:
            per_image = per_image * objective.min_snr_weights(levels, config.min_snr_gamma)
        weighted = per_image * batch.loss_weights
        return weighted.mean() if batch.global_size is None else weighted.sum() / total

    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """LoRA (in the output format), optimizer, schedule, RNG and data position for step N,
        written into a hidden folder and renamed into place whole."""
        final = self.files.checkpoint(self.step)
        state = self.dist.checkpoint_state(training_state(self))  # every process's random state
        if final.exists() or not self.dist.is_main:
            self.dist.barrier()
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=self.files.checkpoints))
        try:
            self._export(staging / f"{self.config.name}-step{self.step:06d}.safetensors")
            with atomic_output(staging / "training_state.pt") as tmp:
                torch.save(state, tmp)
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
        self.dist.barrier()
        return final

    def cleanup(self, result: RunResult) -> RunResult:
        if not self.dist.is_main:
            if self.dist.is_local_main:  # another machine's stop file, read by its own first process
                self.files.clear_stop_request()
            return result
        fields = {"step": self.step}
        if result.lora_path:
            fields["lora_path"] = str(result.lora_path)
            fields["exported_lora"] = result.exported_lora
        if result.error:
            fields["error"] = result.error
        self.status.finish(result.state, **fields)
        self.loggers.close(failed=result.state == "failed")
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
        if not self.dist.is_main:
            return RunResult("completed", self.files.dir, self.step)
        lora_path = self._export(self.files.lora(self.config.name))
        published = publish_final_lora(lora_path, self.config.name, loras_dir())
        log.info("wrote %s%s", lora_path, f", published as {published}" if published else "")
        return RunResult("completed", self.files.dir, self.step, lora_path, published.stem if published else None)

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
                **self.memory.after_step(self.step, record.seconds),  # and a spill into shared memory
            }
        )
        self._stop_wanted = self._stop_wanted or self.memory.stop_wanted
        self.loss_ema = smoothed(self.loss_ema, record.loss)
        self._step_time_ema = smoothed(self._step_time_ema, record.seconds)
        self.status.update(
            step=self.step,
            epoch=self.data.epoch + 1,
            loss=self.loss_ema,
            lr=record.lr,
            **({"grad_norm": record.grad_norm} if math.isfinite(record.grad_norm) else {}),  # fp16-skipped: keep last
            it_per_s=1.0 / self._step_time_ema if self._step_time_ema > 0 else None,
            eta_s=(config.steps - self.step) * self._step_time_ema,
        )
        self.loggers.step(self.step, loss=record.loss, smoothed=self.loss_ema, lr=record.lr, grad_norm=record.grad_norm)
        bar.set_postfix(loss=f"{self.loss_ema:.4f}", lr=f"{record.lr:.2e}", refresh=False)
        bar.update(1)
        if self.step % LOG_EVERY == 0 or self.step == config.steps:
            progress = (self.step, config.steps, self.loss_ema, record.lr, record.grad_norm)
            log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3g", *progress)

    def _validate(self) -> None:
        """The held-out images' validation loss (when there are any) and the LoRA's update size, as
        metrics rows; with the smoothed training loss so far, for the gap between the two."""
        if self.dist.is_main:
            self.loggers.validation(self.step, self.evidence.record(self.step, self.placement, self.loss_ema))
        elif self.validation is not None:  # its share of the validation loss
            self.validation.loss(self.placement.weight_dtype, self.placement.autocast)

    def _samples_due(self) -> bool:
        return self._sampling_on() and self.step % self.config.sample_every == 0

    def _checkpoint_due(self) -> bool:
        """Every save_every steps; the last step writes the final LoRA instead."""
        return self.step % self.config.save_every == 0 and self.step < self.config.steps

    def _notice_stop_request(self) -> None:
        """Whether to stop, agreed by all processes (before training and at auto_stop_on's checks; after
        every step the gradients' all-reduce carries it)."""
        self.stop_requested = self.dist.any(self._wants_stop())

    def request_stop(self) -> None:
        """A signal's stop: the processes agree on it after the step, like any other wish to stop."""
        self._stop_wanted = True

    def _wants_stop(self) -> bool:
        """This process's wish to stop: a signal, auto_stop_on, or the stop every platform has (RunFiles.request_stop),
        read by each machine's first process in its own run directory: one stat per step of tens of milliseconds."""
        if not self._stop_wanted and self.dist.is_local_main and self.files.stop_requested():
            log.info("stop requested (%s): stopping after this step", self.files.stop_request.name)
            self._stop_wanted = True
        return self._stop_wanted

    def _stop_when_asked(self) -> None:
        """auto_stop_on: the run ends after this step when its evidence meets one of the conditions (agreed at
        once: one more all-reduce at these steps only, which validate anyway, rather than one step late)."""
        if self.dist.is_main and (reason := self.evidence.stop_reason()):
            log.warning("%s", reason)
            self.status.update(stop_reason=reason)
            self._stop_wanted = True
        self._notice_stop_request()

    def _render_samples(self) -> None:
        if not self.dist.is_main:
            return self.dist.barrier()
        with self.placement.encoders_on_device():
            rendered = render_samples(self.base, self.placement, self.config, self.files, self.step, self.sample_stats)
        self.status.update(latest_samples=rendered.files)
        if rendered.timed_out:
            self.status.warn(rendered.timed_out)
        self.loggers.samples(self.step)
        self.status.write()
        self.dist.barrier()

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
            num_epochs=math.ceil(self.planned_epochs()),
            started_at=self.started_at,
            run=self.files.dir.name,
        )

    def _dataset_name(self, file: str) -> str:
        path = Path(file)
        return str(path.relative_to(self.dataset.root)) if path.is_relative_to(self.dataset.root) else path.name

    def planned_epochs(self) -> float:
        micro_batches = self.config.steps * self.config.gradient_accumulation_steps
        return micro_batches / max(1, self.data.batches.batches_per_epoch)

    def _open_run_directory(self) -> None:
        if not self.dist.is_main:  # the main process's directory; this machine's first one makes its cache folder
            return self.files.create() if self.dist.is_local_main else None
        self.files.check_new(self.resume)
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

    # --- parameters ----------------------------------------------------------------------------
    def _param_groups(self) -> list[dict]:
        from diffusers.training_utils import cast_training_params

        encoders = self.placement.text_encoders if self.config.train_text_encoder else []
        denoiser = self.base.denoiser
        cast_training_params([denoiser, *encoders], dtype=torch.float32)
        scale = self.dist.world_size if self.config.scale_lr else 1  # the option's description says why
        lr = self.config.learning_rate * scale
        groups = [{"params": [p for p in denoiser.parameters() if p.requires_grad], "lr": lr}]
        if encoders:
            groups.append(
                {
                    "params": [p for encoder in encoders for p in encoder.parameters() if p.requires_grad],
                    "lr": self.config.text_encoder_lr * scale if self.config.text_encoder_lr else lr,
                }
            )
        return groups


def run_training(
    config: TrainingConfig,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    progress: bool = False,
    dist: Distributed | None = None,
) -> RunResult:
    """The one entry point: setup, train, save, cleanup; a stop request (file or signal) stops with a checkpoint.
    A worker of a data-parallel run (`dist`) records its failure for the launcher, unless it failed because
    another process was lost first."""
    trainer = Trainer(config, run_dir, resume=resume, progress=progress, dist=dist)
    out_of_memory = None
    with stop_on_signals(trainer.request_stop):  # a signal while a failure is handled is a stop, not a kill
        try:
            trainer.setup()
            trainer.train()
            result = trainer.finish()
        except RunAlreadyExists:
            raise  # the directory belongs to another run: write nothing into it
        except PeerLost as exc:  # another process failed first: the launcher reports that one
            result = RunResult("failed", trainer.files.dir, trainer.step, error=str(exc))
        except EXPECTED_ERRORS + (NonFiniteLoss,) as exc:
            result = RunResult("failed", trainer.files.dir, trainer.step, error=str(exc))
            trainer.dist.record_failure(result.error)
        except torch.OutOfMemoryError as exc:
            out_of_memory = str(exc)  # handled below, once `exc` and the failed step's frames (its tensors) are gone
        except KeyboardInterrupt:
            error = "interrupted twice: no final checkpoint"
            result = RunResult("stopped", trainer.files.dir, trainer.step, error=error)
        except Exception as exc:
            log.exception("training failed")
            result = RunResult("failed", trainer.files.dir, trainer.step, error=f"{type(exc).__name__}: {exc}")
            trainer.dist.record_failure(result.error)
        if out_of_memory is not None:
            error = out_of_memory_failure(trainer, out_of_memory)
            result = RunResult("failed", trainer.files.dir, trainer.step, error=error)
            trainer.dist.record_failure(result.error)
    return trainer.cleanup(result)
