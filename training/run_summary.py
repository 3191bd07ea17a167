"""The lines a run logs at start-up: the resolved model, data, batch, schedule and optimizer."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.models.loading import LoadedModel
    from training.trainer import Trainer


def describe_run(trainer: Trainer) -> list[str]:
    """The resolved run, printed at start-up."""
    config, data, dataset = trainer.config, trainer.data, trainer.dataset
    buckets = ", ".join(f"{w}x{h}: {n}" for (w, h), n in data.batches.bucket_sizes().items())
    concepts = ", ".join(
        f"{c.folder or '(root)'} x{c.repeats} -> {c.trigger_word or '-'} ({c.num_images})" for c in dataset.concepts
    )
    per_epoch = data.batches.batches_per_epoch
    epochs = trainer.planned_epochs()
    denoiser_params = sum(p.numel() for p in trainer.params[0]["params"])
    te_params = sum(p.numel() for g in trainer.params[1:] for p in g["params"])
    extra = len(data.records) - len(dataset.images)
    scale = trainer.dist.world_size if config.scale_lr else 1
    return [
        f"model: {config.model_name} ({trainer.base.family}, {trainer.base.prediction_type}, "
        f"native {trainer.base.native_resolution}px) on {trainer.device}"
        + (f" ({trainer.device_memory_gb:g} GB)" if trainer.device_memory_gb else ""),
        f"images: {dataset.num_images} ({dataset.num_samples} per epoch with repeats), "
        f"{len(dataset.validation)} held out for validation" + (f", {extra} class images" if extra else ""),
        f"concepts: {concepts}",
        f"buckets (samples): {buckets}",
        f"batch: {config.batch_size} x {config.gradient_accumulation_steps} accumulation"
        + (f" x {trainer.dist.world_size} processes" if trainer.dist.multi else "")
        + f" = {config.effective_batch_size} effective",
        f"steps: {config.steps} ({epochs:.1f} epochs of {per_epoch} batches)",
        f"trainable parameters: {denoiser_params + te_params:,} ({trainer.base.denoiser_prefix} "
        f"{denoiser_params:,}, text encoder {te_params:,}); "
        f"rank {config.rank}, alpha {config.alpha:g}",
        f"optimizer: {config.optimizer} lr {config.learning_rate * scale:g}"
        + (f" (learning_rate x {scale} processes: scale_lr)" if scale > 1 else "")
        + f", {config.lr_scheduler} schedule, {config.lr_warmup_steps} warm-up steps; "
        f"precision {trainer.placement.label}{_quantization_note(trainer.base)}",
        f"run directory: {trainer.files.dir}",
    ]


def _quantization_note(base: LoadedModel) -> str:
    if not base.quantized:
        return ""
    method = base.denoiser.hf_quantizer.quantization_config.quant_method  # bitsandbytes or torchao
    return f", frozen {base.denoiser_prefix} weights in 8 bits ({getattr(method, 'value', method)})"
