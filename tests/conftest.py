"""Shared fixtures: one workspace per test session, where each built-in tiny model is built
once; small generated datasets; a fast training config."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: tests must never try the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from training.config import TrainingConfig  # noqa: E402
from training.data.synthetic import make_shape_dataset  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def workspace(tmp_path_factory) -> Path:
    """LORA_MCP_HOME for the whole session, so built-in models are built once and shared."""
    root = tmp_path_factory.mktemp("workspace")
    os.environ["LORA_MCP_HOME"] = str(root)
    return root


@pytest.fixture(scope="session")
def tiny_sd15(workspace) -> Path:
    from training.models.builtin import ensure_builtin

    return ensure_builtin("builtin:tiny-sd15", workspace / "models")


@pytest.fixture(scope="session")
def tiny_sd2v(workspace) -> Path:
    from training.models.builtin import ensure_builtin

    return ensure_builtin("builtin:tiny-sd2-v", workspace / "models")


@pytest.fixture
def shapes(tmp_path) -> Path:
    """Four 64 px images with captions that start with the trigger word xyz_shape."""
    folder = tmp_path / "shapes"
    make_shape_dataset(folder, 4, trigger_word="xyz_shape")
    return folder


def fast_config(dataset: Path, **overrides) -> TrainingConfig:
    """A config that trains the tiny SD 1.x model for a few steps at 64 px, without samples."""
    values = dict(
        name="test-run",
        model_name="builtin:tiny-sd15",
        dataset_path=str(dataset),
        resolution=64,
        steps=4,
        batch_size=2,
        rank=4,
        learning_rate=1e-3,
        trigger_word="xyz_shape",
        disable_sampling=True,
        save_every=1000,
    )
    values.update(overrides)
    return TrainingConfig.from_dict(values)
