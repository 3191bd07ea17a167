"""What the transformer families' test files (tests/test_family_*.py) check alike on a built-in tiny model: the
model loaded once per module, a LoRA trained in-process on the shape images, renders of fixed latents through the
family's own diffusers pipeline, the rectified-flow loss on the training images at fixed noise, merged LoRAs
against the same LoRAs stacked, lossless conversion, generate-image renders, and the README's example configs
(the files under examples/, which tests/test_examples.py checks against the README)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import fast_config, tiny_pipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from training.config import TrainingConfig
from training.convert import convert_lora_file
from training.families import detect_family, read_geometry
from training.families.base import read_config
from training.generation import GenerationRequest, LoraStrength, generate
from training.lora import LoraFileError
from training.merge import merge_lora_files
from training.models.loading import load_base_model
from training.models.source import resolve_model
from training.plans import recommend_plan
from training.trainer import run_training

PROMPT = "xyz_shape a red circle"
RANK, ALPHA = 4, 2
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def base_model(model_name: str):
    """A module-scoped fixture: `model_name` loaded on the CPU (name it by the variable it is assigned to)."""

    @pytest.fixture(scope="module")
    def fixture(workspace):
        return load_base_model(resolve_model(model_name), torch.device("cpu"))

    return fixture


def train(root: Path, name: str, model_name: str, *, images: int = 6, **options) -> Path:
    """A LoRA of rank 4, alpha 2 trained in-process for 6 steps at a learning rate that moves it, on `images`
    shape images made once in root/data: its run folder root/name (the file root/name/name.safetensors)."""
    from training.data.synthetic import make_shape_dataset

    if not (root / "data").exists():
        make_shape_dataset(root / "data", images, trigger_word="xyz_shape")
    values = dict(name=name, model_name=model_name, steps=6, learning_rate=5e-2, rank=RANK, alpha=ALPHA)
    result = run_training(fast_config(root / "data", **{**values, **options}), root / name)
    assert result.state == "completed", result.error
    return root / name


def trained_lora(model_name: str, **options):
    """A module-scoped fixture: the file of a LoRA of `model_name` trained by `train` with `options`."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory, workspace) -> Path:
        return train(tmp_path_factory.mktemp("lora"), "a", model_name, **options) / "a.safetensors"

    return fixture


def sampling(every: int) -> dict:
    """The options of a run that renders PROMPT (and the control prompt) at step 0 and every `every` steps."""
    return dict(disable_sampling=False, test_prompts=[PROMPT], sample_every=every, sample_steps=2)


def assert_samples_with_control(run: Path, step: int) -> list[dict]:
    """The run's samples: PROMPT and its control at step 0 and `step`, the LoRA's away from the base's."""
    samples = [json.loads(line) for line in (run / "samples" / "index.jsonl").read_text().splitlines()]
    assert [(s["step"], s["control"]) for s in samples] == [(0, False), (0, True), (step, False), (step, True)]
    assert samples[2]["baseline_distance"] > 0
    return samples


def assert_run_records(run: Path, steps: int) -> None:
    """A run of `steps` steps that validated at step 0 and at its end and sampled then (`sampling(every=steps)`):
    a finite loss per step and per validation, PROMPT and its control at both steps, at 64 px."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "kind" not in r]
    assert len(losses) == steps and all(np.isfinite(losses))
    validation = [r for r in rows if r.get("kind") == "validation"]
    assert [r["step"] for r in validation] == [0, steps] and all(np.isfinite([r["loss"] for r in validation]))
    samples = assert_samples_with_control(run, step=steps)
    assert np.asarray(Image.open(run / "samples" / samples[2]["file"])).shape == (64, 64, 3)


def assert_built_in_recognised(model, family: str) -> None:
    """The built-in folder is told as `family`, at the VAE's sample size 64 and 16 px buckets (8 px per latent
    x 2x2 patches)."""
    assert detect_family(model.source) == family and model.family == family
    assert read_geometry(model.source.path) == (64, 16)


def diffusers_pipeline(model):
    """A fresh copy of the built-in model as the diffusers pipeline its model_index.json names (diffusers' own
    class, not the family's subclass)."""
    import diffusers

    pipeline_class = getattr(diffusers, read_config(model.source.path / "model_index.json")["_class_name"])
    return tiny_pipeline(model.source.path, pipeline_class)


def latents(pipe, **options) -> torch.Tensor:
    """PROMPT rendered in 2 steps at 64 px from seed 0, as latents; `options` are the family's guidance."""
    generator = torch.Generator().manual_seed(0)
    # the prompt by name: Flux2Pipeline's first parameter is a reference image
    return pipe(
        prompt=PROMPT, num_inference_steps=2, height=64, width=64, generator=generator, output_type="latent", **options
    ).images


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


def linear_layers(module: torch.nn.Module) -> set[str]:
    """The names of `module`'s linear layers: what a LoRA key may name."""
    return {name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def text_batch(states: torch.Tensor, mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None):
    """The text part of a training Batch, as an objective's `predict` reads it."""
    return SimpleNamespace(conditioning=states, text_mask=mask, pooled=pooled)


def pipeline_objective(objective_class, pipe):
    """`objective_class` (a RectifiedFlow) at the config's defaults over `pipe`'s transformer and scheduler."""
    model = SimpleNamespace(
        denoiser=pipe.transformer, vae_scale_factor=8, device=torch.device("cpu"), noise_scheduler=pipe.scheduler
    )
    return objective_class(model, TrainingConfig(name="x", dataset_path="/d"))


def training_images(folder: Path) -> tuple[torch.Tensor, list[str]]:
    """The training images of a shape dataset as pixels in [-1, 1], and their captions."""
    images = sorted(folder.glob("*.png"))
    pixels = torch.stack(
        [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)).permute(2, 0, 1) for p in images]
    )
    return pixels / 127.5 - 1, [p.with_suffix(".txt").read_text() for p in images]


@torch.no_grad()
def flow_loss(objective, x0: torch.Tensor, batch) -> float:
    """The rectified-flow loss of `objective`'s transformer on latents `x0` at noise levels 0.25, 0.5 and 0.75 and
    fixed noise: what training lowers."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    losses = []
    for sigma in (0.25, 0.5, 0.75):
        sigmas = torch.full((len(x0),), sigma)
        noisy, target = objective.noisy_and_target(x0, noise, sigmas)
        predicted = objective.predict(noisy, sigmas, batch, torch.float32)
        losses.append(torch.nn.functional.mse_loss(predicted, target).item())
    return sum(losses) / len(losses)


def assert_changes_and_strength_0_is_base(pipe, render, base: torch.Tensor, adapter: str) -> None:
    """With `adapter` loaded in `pipe`, `render` (a latents function) changes at strength 1 and is `base`
    exactly at strength 0; `adapter` is left at strength 1."""
    pipe.set_adapters([adapter], [1.0])
    assert (render(pipe) - base).abs().max() > 1e-3
    pipe.set_adapters([adapter], [0.0])
    assert torch.equal(render(pipe), base)
    pipe.set_adapters([adapter], [1.0])


def with_other_up_weights(source: Path, path: Path, scale: float) -> Path:
    """A second LoRA at `path`: `source` with random up weights of std `scale` (same layers, same base model; a
    second training would cost seconds)."""
    tensors, metadata = read_tensors(source)
    generator = torch.Generator().manual_seed(1)
    for key in tensors:
        if "lora_B" in key:
            tensors[key] = torch.randn(tensors[key].shape, generator=generator) * scale
    save_file(tensors, str(path), metadata=metadata)
    return path


def assert_merged_equals_stacked(pipe, render, a: Path, b: Path, folder: Path, *, acts: float = 1e-3) -> Path:
    """a at 1 and b at 0.5 merged into one comfyui-layout file render as a and b stacked at those strengths in
    `pipe` (with no adapters loaded), b changing the stack by more than `acts`: the merged file."""
    merged = merge_lora_files([(a, 1.0), (b, 0.5)], folder / "merged.safetensors", output_format="comfyui")
    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.load_lora_weights(str(b), adapter_name="b")
    pipe.set_adapters(["a", "b"], [1.0, 0.5])
    stacked = render(pipe)
    pipe.set_adapters(["a"], [1.0])
    assert (stacked - render(pipe)).abs().max() > acts  # B acts in the stack
    pipe.delete_adapters(["a", "b"])
    pipe.load_lora_weights(str(merged), adapter_name="merged")
    from_merge = render(pipe)
    assert torch.allclose(from_merge, stacked, atol=1e-4), (from_merge - stacked).abs().max()
    return merged


def assert_converts_losslessly_and_never_to_kohya(source: Path, folder: Path, refusal: str) -> None:
    """To comfyui: the same tensors under the same names; to kohya: refused with `refusal`, no file written."""
    comfy = convert_lora_file(source, folder / "comfy.safetensors", "comfyui")
    a, _ = read_tensors(source)
    b, _ = read_tensors(comfy)
    assert sorted(a) == sorted(b) and all(torch.equal(a[key], b[key]) for key in a)
    with pytest.raises(LoraFileError, match=refusal):
        convert_lora_file(source, folder / "kohya.safetensors", "kohya")
    assert not (folder / "kohya.safetensors").exists()


def render(model_name: str, folder: Path, **options) -> list[np.ndarray]:
    """generate-image's images of PROMPT in 2 steps (compare-lora-strengths' and its grid with `strengths`)."""
    request = GenerationRequest(model_name=model_name, prompt=PROMPT, steps=2, **options)
    return [np.asarray(Image.open(path), dtype=np.int16) for path in generate(request, folder)]


def assert_renders_at_its_strengths(model_name: str, lora: Path, folder: Path) -> np.ndarray:
    """generate-image renders the base model; compare-lora-strengths renders the LoRA at 0, 0.5 and 1 from the same
    seed, and their grid: the base at 0, another image at 0.5 and again at 1. The base image."""
    [base] = render(model_name, folder / "base")
    compare = dict(loras=[LoraStrength(path=str(lora))], strengths=[0.0, 0.5, 1.0])
    zero, half, one, grid = render(model_name, folder / "compare", **compare)
    assert np.array_equal(zero, base) and base.shape == (64, 64, 3)  # strength 0 is the base model
    assert np.abs(one - base).mean() > 0.5 and not np.array_equal(half, one)
    assert grid.shape[1] == 3 * 64
    return base


def plan(model_name: str, native_resolution: int | None, **options):
    """recommend-training-plan for a 20-image style LoRA on `model_name`."""
    arguments = dict(
        images=20,
        lora_type="style",
        goal="balanced",
        dataset_path="watercolor",
        name="wc",
        trigger_word="wc_style",
    )
    return recommend_plan(model_name=model_name, native_resolution=native_resolution, **arguments, **options)


def conflicts(family: str, **options) -> tuple[list[str], list[str]]:
    """The family's (errors, warnings) for a config with `options`."""
    return TrainingConfig(name="x", dataset_path="/d", **options).family_conflicts(family)


def example(file_name: str) -> TrainingConfig:
    """The example config examples/`file_name` (the README's)."""
    return TrainingConfig.load(EXAMPLES / file_name)
