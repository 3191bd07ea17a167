"""Devices and precision: the order a device is picked in, the one table of what each device runs for
each mixed_precision, and real fp16/bf16 training on the CPU through the same autocast, storage types
and gradient scaler a GPU run uses."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import fast_config, step_rows

from training.config import TrainingConfig
from training.models.loading import DeviceProbe, frozen_dtypes, load_base_model, pick_device
from training.models.source import resolve_model
from training.placement import PRECISIONS, Placement, half_dtype
from training.trainer import Trainer


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_the_device_is_cuda_then_an_apple_gpu_then_the_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.delenv("LORA_TRAIN_DEVICE", raising=False)
    assert pick_device(DeviceProbe(cuda=lambda: cuda, mps=lambda: mps)).type == expected


def test_lora_train_device_overrides_the_order(monkeypatch):
    monkeypatch.setenv("LORA_TRAIN_DEVICE", "cpu")
    assert pick_device(DeviceProbe(cuda=lambda: True, mps=lambda: True)).type == "cpu"


def test_every_device_runs_both_half_types_and_only_fp16_on_cuda_and_cpu_is_scaled():
    for device in ("cuda", "mps", "cpu"):
        assert half_dtype("fp16", device) == torch.float16
        assert half_dtype("bf16", device) == torch.bfloat16
        assert half_dtype("no", device) is None
    assert half_dtype("bf16", "xpu") is None  # a device the table does not name trains in fp32
    scaled = {key for key, support in PRECISIONS.items() if support.grad_scaler}
    assert scaled == {("cuda", "fp16"), ("cpu", "fp16")}  # bf16 has fp32's range; MPS's GradScaler lost gradients
    # The frozen weights follow the same table, with the family's fp16 exceptions.
    assert frozen_dtypes("fp16", "cpu", "sd1") == {"default": torch.float16, "vae": torch.float32}
    assert frozen_dtypes("bf16", "mps", "flux") == {"default": torch.bfloat16}
    assert frozen_dtypes("bf16", "xpu", "flux") == {"default": torch.float32}


def test_the_gradient_scaler_is_on_for_fp16_on_the_cpu_only():
    def scaler(precision: str, device: str) -> bool:
        config = TrainingConfig(name="x", dataset_path="/d", mixed_precision=precision)
        return Placement(None, config, torch.device(device)).scaler.is_enabled()

    assert scaler("fp16", "cpu")
    assert not scaler("bf16", "cpu") and not scaler("no", "cpu") and not scaler("fp16", "mps")


# The components the README keeps in fp32 under fp16: SD and SDXL VAEs overflow in fp16, so does FLUX's T5.
FP32_UNDER_FP16 = {
    "builtin:tiny-sd15": {"vae"},
    "builtin:tiny-sdxl": {"vae"},
    "builtin:tiny-flux": {"vae", "text_encoder_2"},
}


def generated(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "xyz_shape a red circle", num_inference_steps=2, height=64, width=64, generator=generator, output_type="latent"
    ).images


@pytest.mark.parametrize(
    ("model", "precision"),
    [
        ("builtin:tiny-sd15", "fp16"),
        ("builtin:tiny-sd15", "bf16"),
        ("builtin:tiny-sdxl", "fp16"),
        ("builtin:tiny-flux", "fp16"),
        ("builtin:tiny-flux", "bf16"),
    ],
)
def test_half_precision_trains_on_the_cpu_with_the_promised_types(tmp_path, shapes, model, precision):
    config = fast_config(shapes, model_name=model, mixed_precision=precision, steps=3, learning_rate=1e-2)
    trainer = Trainer(config, tmp_path / "run")
    trainer.setup()
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    kept_fp32 = FP32_UNDER_FP16[model] if precision == "fp16" else set()
    for name, component in trainer.base.pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            frozen = {p.dtype for p in component.parameters() if not p.requires_grad}
            assert frozen == {torch.float32 if name in kept_fp32 else half}, name
    assert {p.dtype for p in trainer.trainable} == {torch.float32}  # LoRA weights train in fp32
    assert trainer.placement.scaler.is_enabled() == (precision == "fp16")
    trainer.train()
    result = trainer.cleanup(trainer.finish())
    assert result.state == "completed", result.error

    losses = [row["loss"] for row in step_rows(tmp_path / "run")]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["device"] == "cpu"
    assert f"mixed_precision {precision} on cpu" in (tmp_path / "run" / "train.log").read_text()

    pipe = load_base_model(resolve_model(model), torch.device("cpu")).pipeline  # fp32, as users load it
    before = generated(pipe)
    pipe.load_lora_weights(str(result.lora_path), adapter_name="trained")
    assert (generated(pipe) - before).abs().max() > 1e-3


def test_an_fp16_run_resumes_with_its_gradient_scale(tmp_path, shapes):
    from test_training import _losses, _StopAfter

    from training.trainer import run_training

    config = fast_config(shapes, steps=4, mixed_precision="fp16", batch_size=1)
    straight = run_training(config, tmp_path / "straight")
    stopped = _StopAfter(config, tmp_path / "resumed")
    stopped.setup()
    stopped.train()
    scaler = stopped.placement.scaler.state_dict()
    assert stopped.cleanup(stopped.finish()).step == 3 and scaler["scale"] == 2.0**16  # no overflow in 3 steps

    resumed = Trainer(config, tmp_path / "resumed", resume=True)
    resumed.setup()
    assert resumed.placement.scaler.state_dict() == scaler  # scale and steps since the last overflow
    resumed.train()
    assert resumed.cleanup(resumed.finish()).state == "completed" == straight.state
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")
