"""SDXL on the built-in tiny SDXL pipeline: conditioning as diffusers computes it, a few training
steps, and a LoRA file that diffusers' StableDiffusionXLPipeline loads and that changes its output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fast_config, tiny_pipeline
from PIL import Image
from safetensors import safe_open

from training.data.loader import TrainingData
from training.lora import read_lora_file
from training.models.loading import load_base_model
from training.models.source import resolve_model
from training.prompts import encode_text
from training.trainer import run_training


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return load_base_model(resolve_model("builtin:tiny-sdxl"), torch.device("cpu"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sdxl) -> Path:
    from training.data.synthetic import make_shape_dataset

    root = tmp_path_factory.mktemp("sdxl")
    make_shape_dataset(root / "data", 6, trigger_word="xyz_shape")
    config = fast_config(
        root / "data",
        model_name="builtin:tiny-sdxl",
        steps=4,
        learning_rate=5e-2,
        disable_sampling=False,
        test_prompts=["xyz_shape a red circle"],
        sample_every=4,
        sample_steps=2,
        validation_split=0.34,
        validation_every=2,
    )
    result = run_training(config, root / "run")
    assert result.state == "completed", result.error
    return root / "run"


def sdxl_pipeline(sdxl):
    from diffusers import StableDiffusionXLPipeline

    return tiny_pipeline(sdxl.source.path, StableDiffusionXLPipeline)


def latents(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe("xyz_shape a red circle", num_inference_steps=2, generator=generator, output_type="latent").images


def test_prompts_are_encoded_as_diffusers_encodes_them_for_sdxl(sdxl):
    prompts = ["xyz_shape a red circle", "a blue square on white"]
    ours = encode_text(sdxl, prompts, max_token_length=75, clip_skip=1)
    states, _, pooled, _ = sdxl.pipeline.encode_prompt(
        prompts, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    assert torch.equal(ours.states, states) and torch.equal(ours.pooled, pooled)
    assert ours.states.shape == (2, 77, 64) and ours.pooled.shape == (2, 32)  # both encoders' 32 features


def test_batches_carry_the_pooled_text_and_the_size_and_crop_ids(tmp_path, sdxl):
    from training.data.dataset import scan_dataset

    (tmp_path / "data").mkdir()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(tmp_path / "data" / "wide.png")
    (tmp_path / "data" / "wide.txt").write_text("xyz_shape a wide red image")
    index = scan_dataset(tmp_path / "data", trigger_word="xyz_shape", trigger_words={})
    config = fast_config(tmp_path / "data", model_name="builtin:tiny-sdxl", batch_size=1, enable_bucketing=False)
    config = config.resolve(native_resolution=64, num_images=1)
    data = TrainingData(index.images, sdxl, config, tmp_path / "cache")
    data.cache_latents()
    data.cache_text()
    batch = data.next_batch()
    # original 64 high x 96 wide; resized to 96x64 already covers 64x64, centre crop starts 16 px in; target 64x64
    assert batch.time_ids.tolist() == [[64.0, 96.0, 0.0, 16.0, 64.0, 64.0]]
    assert batch.pooled.shape == (1, 32)
    added = batch.added_conditions(torch.float32)
    assert set(added) == {"text_embeds", "time_ids"}


def test_tiny_sdxl_trains_and_its_lora_loads_in_diffusers_and_changes_the_image(trained, sdxl):
    lora = trained / "test-run.safetensors"
    with safe_open(str(lora), framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert all(key.startswith("lora_unet_") for key in keys)
    weights = read_lora_file(
        lora, {"unet": sdxl.denoiser, "text_encoder": sdxl.text_encoder}
    )  # every key names a module of the UNet
    assert len(weights) == len(keys) // 3  # down, up and alpha per module

    pipe = sdxl_pipeline(sdxl)
    base = latents(pipe)
    pipe.load_lora_weights(str(lora), adapter_name="trained")
    assert (latents(pipe) - base).abs().max() > 1e-3
    pipe.set_adapters(["trained"], [0.0])
    assert torch.equal(latents(pipe), base)


def test_an_sdxl_run_records_validation_samples_and_its_control_prompt(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("kind") == "validation"] == [0, 2, 4]
    samples = [json.loads(line) for line in (trained / "samples" / "index.jsonl").read_text().splitlines()]
    assert [(s["step"], s["control"]) for s in samples] == [(0, False), (0, True), (4, False), (4, True)]
    image = np.asarray(Image.open(trained / "samples" / samples[2]["file"]))
    assert image.shape == (64, 64, 3) and samples[2]["baseline_distance"] > 0


def test_both_sdxl_text_encoders_train_as_kohya_te1_and_te2(tmp_path, shapes, sdxl):
    config = fast_config(
        shapes, model_name="builtin:tiny-sdxl", steps=3, learning_rate=5e-2, train_text_encoder=True, save_every=2
    )
    result = run_training(config, tmp_path / "run")
    assert result.state == "completed", result.error
    with safe_open(str(result.lora_path), framework="pt") as f:
        prefixes = {key.split("_")[1] for key in f.keys()}
    assert prefixes == {"unet", "te1", "te2"}
    weights = read_lora_file(result.lora_path, sdxl.lora_models)  # every key names a module of the model
    assert {name.split(".")[0] for name in weights} == {"unet", "text_encoder", "text_encoder_2"}

    pipe = sdxl_pipeline(sdxl)
    base = latents(pipe)
    pipe.load_lora_weights(str(result.lora_path), adapter_name="trained")
    assert pipe.get_list_adapters() == {"unet": ["trained"], "text_encoder": ["trained"], "text_encoder_2": ["trained"]}
    pipe.set_adapters(["trained"], [{"unet": 0.0, "text_encoder": 1.0, "text_encoder_2": 1.0}])
    assert (latents(pipe) - base).abs().max() > 1e-3  # the text encoders' part alone moves the image

    # generate-image's strength 0 turns off all three parts, both text encoders included.
    from training.generation import GenerationRequest, generate
    from training.generation import LoraStrength as LoraUse

    def image(loras: list) -> np.ndarray:
        request = GenerationRequest(model_name="builtin:tiny-sdxl", prompt="xyz_shape", steps=2, loras=loras)
        [path] = generate(request, tmp_path / f"g{len(list(tmp_path.iterdir()))}")
        return np.asarray(Image.open(path), dtype=np.int16)

    off = LoraUse(path=str(result.lora_path), strength_model=0.0)
    assert np.array_equal(image([off]), image([]))

    # The same file converts losslessly to the diffusers layout and back.
    from training.convert import convert_lora_file

    as_diffusers = convert_lora_file(result.lora_path, tmp_path / "d.safetensors", "diffusers")
    back = convert_lora_file(as_diffusers, tmp_path / "k.safetensors", "kohya")
    with safe_open(str(result.lora_path), framework="pt") as a, safe_open(str(back), framework="pt") as b:
        assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


LONG = "xyz_shape " + " ".join(f"word{i}" for i in range(15))  # ~100 tokens: the tiny tokenizer is byte-level


def test_long_captions_condition_sdxl_past_75_tokens(sdxl):
    tail_a, tail_b = LONG + " a red circle", LONG + " a blue square"
    assert len(sdxl.tokenizer(tail_a).input_ids) > 77  # the two captions differ only past token 75
    at_75 = encode_text(sdxl, [tail_a, tail_b], max_token_length=75, clip_skip=1)
    at_150 = encode_text(sdxl, [tail_a, tail_b], max_token_length=150, clip_skip=1)
    assert torch.equal(at_75.states[0], at_75.states[1])  # truncated at 75: the tails are lost
    assert at_150.states.shape == (2, 152, 64) and not torch.allclose(at_150.states[0], at_150.states[1])
    # kohya's pooled embedding: the second encoder's, of the first chunk.
    assert torch.equal(at_150.pooled, at_75.pooled)
    # A short caption's first chunk is its 75-token encoding.
    short_75 = encode_text(sdxl, ["xyz_shape a red circle"], max_token_length=75, clip_skip=1)
    short_150 = encode_text(sdxl, ["xyz_shape a red circle"], max_token_length=150, clip_skip=1)
    assert torch.equal(short_150.states[:, :76], short_75.states[:, :76])


def test_sdxl_trains_and_samples_with_captions_over_75_tokens(tmp_path, shapes, tiny_sdxl):
    for caption in shapes.glob("*.txt"):
        caption.write_text(LONG + " " + caption.read_text())
    config = fast_config(
        shapes,
        model_name="builtin:tiny-sdxl",
        max_token_length=150,
        steps=2,
        disable_sampling=False,
        sample_every=2,
        sample_steps=2,
        test_prompts=[LONG + " a red circle"],
    )
    result = run_training(config, tmp_path / "r")
    assert result.state == "completed", result.error
    assert list((tmp_path / "r" / "samples").glob("*.png"))


def test_generate_image_uses_an_sdxl_lora_at_its_strength(tmp_path, trained):
    from training.generation import GenerationRequest, generate
    from training.generation import LoraStrength as LoraUse

    def image(strength: float | None) -> np.ndarray:
        lora = LoraUse(path=str(trained / "test-run.safetensors"), strength_model=strength or 0.0)
        loras = [] if strength is None else [lora]
        request = GenerationRequest(model_name="builtin:tiny-sdxl", prompt="xyz_shape", steps=2, loras=loras)
        [path] = generate(request, tmp_path / f"s{strength}")
        return np.asarray(Image.open(path), dtype=np.int16)

    base = image(None)
    assert np.array_equal(image(0.0), base) and not np.array_equal(image(1.0), base)


def test_clip_skip_is_said_to_have_no_effect_on_sdxl(tmp_path, shapes, tiny_sdxl):
    result = run_training(fast_config(shapes, model_name="builtin:tiny-sdxl", steps=1, clip_skip=2), tmp_path / "r")
    assert result.state == "completed"
    assert "clip_skip 2 has no effect on SDXL" in (tmp_path / "r" / "train.log").read_text()
