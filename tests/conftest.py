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


@pytest.fixture(scope="session")
def tiny_sdxl(workspace) -> Path:
    from training.models.builtin import ensure_builtin

    return ensure_builtin("builtin:tiny-sdxl", workspace / "models")


@pytest.fixture(scope="session")
def tiny_git(tmp_path_factory) -> Path:
    """A GIT image-to-text model at toy size with random weights: its captions are nonsense,
    the plumbing (processor, generate, decode) is the real one."""
    import torch
    from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    folder = tmp_path_factory.mktemp("tiny-git")
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *["a", "the", "red", "blue", "cat", "dog", "on", "in", "photo", "of", "with"],
    ]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    processor = GitProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=BertTokenizer(str(folder / "vocab.txt")),
    )
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=16
    )
    config = GitConfig(
        vision_config=vision,
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model_folder = folder / "model"
    GitForCausalLM(config).save_pretrained(model_folder)
    processor.save_pretrained(model_folder)
    return model_folder


@pytest.fixture(scope="session")
def http_server(tmp_path_factory, tiny_sd15):
    """One `lora-mcp http` process (token auth, loopback, free port) shared by the HTTP tests: see
    tests/http_server.py for what it offers (url, token, headers, workspace)."""
    from http_server import start_http_server

    server = start_http_server(tmp_path_factory.mktemp("http-workspace"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def open_http_server(tmp_path_factory, tiny_sd15):
    """`lora-mcp http --no-auth` on loopback: how the guide's HTTP samples run."""
    from http_server import start_http_server

    server = start_http_server(tmp_path_factory.mktemp("open-http-workspace"), "--no-auth")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def lora_bytes(tmp_path_factory) -> bytes:
    """A real safetensors LoRA of about 300 KB: 5 chunks of 64 KiB (the last one short), or 2 of the guide's
    256 KiB. Its own metadata names a trigger phrase (file_phrase) and a base model (sd15)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "lora_unet_mid.lora_down.weight": torch.randn(64, 512, generator=generator),
        "lora_unet_mid.lora_up.weight": torch.randn(512, 64, generator=generator),
        "lora_unet_mid.alpha": torch.tensor(8.0),
        "lora_te_extra.lora_down.weight": torch.randn(64, 150, generator=generator).half(),
    }
    path = tmp_path_factory.mktemp("lora") / "made.safetensors"
    save_file(tensors, str(path), metadata={"modelspec.trigger_phrase": "file_phrase", "ss_sd_model_name": "sd15"})
    data = path.read_bytes()
    assert 4 * 65536 < len(data) < 5 * 65536
    return data


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


def step_rows(run: Path) -> list[dict]:
    """The optimizer-step rows of a run's metrics.jsonl (validation and update rows have a `kind`)."""
    import json

    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [row for line in path.read_text().splitlines() if "kind" not in (row := json.loads(line))]


def tiny_pipeline(folder: Path, pipeline_class=None):
    """A quiet diffusers pipeline of a built-in tiny model folder: StableDiffusionPipeline without
    safety checker by default, or `pipeline_class` (StableDiffusionXLPipeline, FluxPipeline)."""
    from diffusers import StableDiffusionPipeline

    if pipeline_class is None:
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    else:
        pipe = pipeline_class.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe
