"""Every optimizer and schedule of the config, by name."""

from __future__ import annotations

import importlib.util
import typing

import pytest
import torch

from training.config import LrScheduler, Optimizer
from training.optimizers import OptimizerUnavailable, build_lr_scheduler, build_optimizer


def _installed(name: str) -> bool:
    module = {"adamw8bit": "bitsandbytes", "lion": "lion_pytorch", "prodigy": "prodigyopt"}.get(name)
    return module is None or importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("name", typing.get_args(Optimizer))
def test_each_optimizer_reduces_a_loss_or_names_its_package(name):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 8))
    target = torch.randn(8, 8)
    lr = 1.0 if name == "prodigy" else 1e-2
    if not _installed(name):
        with pytest.raises(OptimizerUnavailable, match="bitsandbytes|lion-pytorch|prodigyopt") as raised:
            build_optimizer(name, [{"params": [weight], "lr": lr}], lr)
        assert "pip install" in str(raised.value)
        return
    if name == "adamw8bit" and not torch.cuda.is_available():
        pytest.skip("bitsandbytes' 8-bit AdamW needs CUDA")
    optimizer = build_optimizer(name, [{"params": [weight], "lr": lr}], lr)
    first = None
    for _ in range(30):
        loss = ((weight - target) ** 2).mean()
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert ((weight - target) ** 2).mean().item() < first


@pytest.mark.parametrize("name", typing.get_args(LrScheduler))
def test_each_schedule_follows_its_shape(name):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_lr_scheduler(name, optimizer, warmup_steps=10, total_steps=100, num_cycles=3)
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    if name == "constant":
        assert set(lrs) == {1.0}
    else:
        assert lrs[0] < lrs[10] == pytest.approx(1.0)  # warm-up
    if name in ("linear", "cosine", "polynomial"):
        assert lrs[-1] < 0.05 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    if name == "cosine_with_restarts":
        rises = sum(1 for a, b in zip(lrs[10:], lrs[11:]) if b > a + 0.5)
        assert rises == 2  # three cycles: two restarts
    if name == "constant_with_warmup":
        assert set(lrs[10:]) == {1.0}
