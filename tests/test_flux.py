"""FLUX on the built-in tiny FluxPipeline: T5 + CLIP conditioning as diffusers computes it, noise
levels drawn as the config asks, a training forward pass that is the pipeline's own denoising step,
and a LoRA file (diffusers layout with alphas) that FluxPipeline loads, that changes its output, and
that merges, converts and renders through generate-image."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fast_config, tiny_pipeline
from PIL import Image
from safetensors import safe_open

from training.config import TrainingConfig
from training.convert import convert_lora_file
from training.families.flux import FlowMatchingObjective
from training.generation import GenerationRequest, generate
from training.generation import LoraStrength as LoraUse
from training.lora import LoraFileError, read_lora_file
from training.merge import merge_lora_files
from training.models.loading import load_base_model
from training.models.source import resolve_model
from training.prompts import encode_text
from training.trainer import run_training

PROMPT = "xyz_shape a red circle"


@pytest.fixture(scope="module")
def flux(workspace):
    return load_base_model(resolve_model("builtin:tiny-flux"), torch.device("cpu"))


def train(root: Path, name: str, **options) -> Path:
    from training.data.synthetic import make_shape_dataset

    if not (root / "data").exists():
        make_shape_dataset(root / "data", 6, trigger_word="xyz_shape")
    values = dict(name=name, model_name="builtin:tiny-flux", steps=4, learning_rate=5e-2, rank=4, alpha=2)
    result = run_training(fast_config(root / "data", **{**values, **options}), root / name)
    assert result.state == "completed", result.error
    return root / name


@pytest.fixture(scope="module")
def trained(tmp_path_factory, flux) -> Path:
    return train(
        tmp_path_factory.mktemp("flux"),
        "a",
        disable_sampling=False,
        test_prompts=[PROMPT],
        sample_every=4,
        sample_steps=2,
        validation_split=0.34,
        validation_every=2,
    )


@pytest.fixture(scope="module")
def second(tmp_path_factory, flux) -> Path:
    return train(tmp_path_factory.mktemp("flux-b"), "b", seed=7, timestep_sampling="uniform")


def flux_pipeline(flux):
    from diffusers import FluxPipeline

    return tiny_pipeline(flux.source.path, FluxPipeline)


def latents(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=2, height=64, width=64, generator=generator, output_type="latent").images


def objective(flux, **options) -> FlowMatchingObjective:
    config = TrainingConfig(name="x", dataset_path="/d", **options)
    return FlowMatchingObjective(flux, config)


# --- conditioning and the objective ---------------------------------------------------------------


def test_prompts_are_encoded_as_fluxpipeline_encodes_them(flux):
    prompts = [PROMPT, "a blue square on white"]
    ours = encode_text(flux, prompts, max_token_length=75, clip_skip=1)
    states, pooled, _ = flux.pipeline.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=512)
    assert torch.equal(ours.states, states) and torch.equal(ours.pooled, pooled)
    assert ours.states.shape == (2, 512, 32) and ours.pooled.shape == (2, 32)  # T5 tokens (dev: 512), CLIP pooled


def test_noise_levels_follow_timestep_sampling(flux):
    batch = torch.zeros(20_000, 16, 8, 8)  # 8x8 latents: 16 packed 2x2 patches

    def draw(**options) -> torch.Tensor:
        return objective(flux, **options).sample_levels(batch, torch.Generator().manual_seed(0))

    uniform = draw(timestep_sampling="uniform")
    assert uniform.min() >= 0 and uniform.max() < 1
    assert uniform.mean() == pytest.approx(0.5, abs=0.01) and uniform.std() == pytest.approx(12**-0.5, abs=0.01)
    logit_normal = draw(timestep_sampling="logit_normal")
    middle = ((logit_normal > 0.25) & (logit_normal < 0.75)).float().mean()
    assert middle == pytest.approx(0.728, abs=0.015)  # P(|z| < logit(0.75) = 1.0986) for z ~ N(0, 1)
    shifted = draw(timestep_sampling="shift", timestep_shift=3.0)
    assert shifted.median() == pytest.approx(0.75, abs=0.01)  # 3 * 0.5 / (1 + 2 * 0.5)
    # The tiny model's scheduler has shift 1: its own shift leaves the logit-normal draws as they are.
    assert torch.equal(draw(timestep_sampling="shift"), logit_normal)


def test_the_default_shift_is_the_model_schedulers_own_by_resolution(flux):
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1-dev's scheduler: the shift grows with the image's token count.
    dev = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256
    )
    sampler = objective(dataclasses.replace(flux, noise_scheduler=dev))
    assert sampler.shift(tokens=256) == pytest.approx(math.exp(0.5))  # 256 px
    assert sampler.shift(tokens=4096) == pytest.approx(math.exp(1.15))  # 1024 px: 3.16
    assert objective(flux, timestep_shift=2.0).shift(tokens=4096) == 2.0


def test_the_training_forward_pass_is_the_pipelines_denoising_step(flux):
    """One Euler step of FluxPipeline from pure noise (sigma 1 -> 0) lands at noise - velocity, with the
    velocity our training forward pass predicts: packing, position ids, timestep and guidance agree."""
    pipe, sampler = flux.pipeline, objective(flux)
    text = encode_text(flux, [PROMPT], max_token_length=75, clip_skip=1)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    batch = type("Conditioning", (), {"conditioning": text.states, "pooled": text.pooled})
    with torch.no_grad():
        velocity = sampler.predict(noise, torch.ones(1), batch, torch.float32)
        packed = pipe._pack_latents(noise, 1, 16, 8, 8)
        stepped = pipe(
            prompt_embeds=text.states,
            pooled_prompt_embeds=text.pooled,
            latents=packed,
            sigmas=[1.0],
            num_inference_steps=1,
            guidance_scale=1.0,  # the guidance input training uses
            height=64,
            width=64,
            output_type="latent",
        ).images
    assert torch.allclose(pipe._unpack_latents(stepped, 64, 64, 8), noise - velocity, atol=1e-5)


def test_flow_matching_mixes_image_and_noise_and_targets_their_difference(flux):
    sampler = objective(flux)
    x0, noise = torch.full((2, 16, 2, 2), 3.0), torch.full((2, 16, 2, 2), -1.0)
    noisy, target = sampler.noisy_and_target(x0, noise, torch.tensor([0.0, 0.25]))
    assert torch.equal(noisy[0], x0[0]) and torch.allclose(noisy[1], torch.full((16, 2, 2), 2.0))
    assert torch.equal(target, noise - x0)


# --- training, the file, and diffusers ------------------------------------------------------------


def test_tiny_flux_trains_and_its_lora_loads_in_diffusers_and_changes_the_image(trained, flux):
    lora = trained / "a.safetensors"
    with safe_open(str(lora), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata()
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert json.loads(metadata["training_config"])["output_format"] == "diffusers"  # FLUX's default layout

    linear = {name for name, m in flux.denoiser.named_modules() if isinstance(m, torch.nn.Linear)}
    modules = {key.removeprefix("transformer.").removesuffix(".alpha") for key in tensors if key.endswith(".alpha")}
    assert len(tensors) == 3 * len(modules)  # lora_A, lora_B and alpha per module
    assert modules <= linear  # every key names a real layer of the transformer
    double = {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.ff.net.2"}
    assert double <= modules
    assert {"single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"} <= modules
    assert "proj_out" not in modules  # the final projection to latent patches stays as it is
    assert all(float(value) == 2.0 for key, value in tensors.items() if key.endswith(".alpha"))
    weights = read_lora_file(lora, flux.lora_models)
    assert {w.alpha for w in weights.values()} == {2.0} and len(weights) == len(modules)

    pipe = flux_pipeline(flux)
    base = latents(pipe)
    pipe.load_lora_weights(str(lora), adapter_name="trained")
    assert pipe.transformer.transformer_blocks[0].attn.to_q.scaling["trained"] == 0.5  # alpha 2 / rank 4, read
    assert (latents(pipe) - base).abs().max() > 1e-3
    pipe.set_adapters(["trained"], [0.0])
    assert torch.equal(latents(pipe), base)


def test_a_flux_run_records_validation_and_samples_with_its_control_prompt(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in rows if r.get("kind") == "validation"]
    assert [r["step"] for r in validation] == [0, 2, 4] and all(math.isfinite(r["loss"]) for r in validation)
    samples = [json.loads(line) for line in (trained / "samples" / "index.jsonl").read_text().splitlines()]
    assert [(s["step"], s["control"]) for s in samples] == [(0, False), (0, True), (4, False), (4, True)]
    image = np.asarray(Image.open(trained / "samples" / samples[2]["file"]))
    assert image.shape == (64, 64, 3) and samples[2]["baseline_distance"] > 0


def test_options_that_do_not_fit_flux_fail_the_run_with_the_reason(tmp_path, shapes, flux):
    config = fast_config(shapes, model_name="builtin:tiny-flux", train_text_encoder=True)
    result = run_training(config, tmp_path / "run")
    assert result.state == "failed" and "FLUX LoRAs train the transformer only" in result.error


def test_target_modules_choose_the_adapted_layers(tmp_path, shapes, flux):
    config = fast_config(shapes, model_name="builtin:tiny-flux", steps=1, target_modules=["to_q", "to_v"])
    result = run_training(config, tmp_path / "run")
    assert result.state == "completed", result.error
    with safe_open(str(result.lora_path), framework="pt") as f:
        modules = {key.rsplit(".", 1)[0].removeprefix("transformer.") for key in f.keys() if key.endswith(".alpha")}
    assert modules == {
        f"{blocks}.0.attn.{p}"
        for blocks in ("transformer_blocks", "single_transformer_blocks")
        for p in ("to_q", "to_v")
    }


def test_target_modules_that_name_no_linear_layer_fail_the_run_with_the_names_to_use(tmp_path, shapes, flux):
    config = fast_config(shapes, model_name="builtin:tiny-flux", steps=1, target_modules=["to_q", "norm1", "nope"])
    result = run_training(config, tmp_path / "run")
    assert result.state == "failed"
    assert "'norm1' names AdaLayerNormZero layers, not linear or conv ones" in result.error
    assert "'nope' names no layer of the transformer" in result.error and "to_out.0" in result.error


# --- merge, convert, generate ---------------------------------------------------------------------


def test_two_flux_loras_merged_equal_them_stacked(trained, second, flux, tmp_path):
    a, b = trained / "a.safetensors", second / "b.safetensors"
    merged = merge_lora_files([(a, 1.0), (b, 0.5)], tmp_path / "merged.safetensors", output_format="comfyui")
    with safe_open(str(merged), framework="pt") as f:
        keys = list(f.keys())
    assert all(key.startswith("transformer.") for key in keys) and any(key.endswith(".alpha") for key in keys)

    pipe = flux_pipeline(flux)
    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.load_lora_weights(str(b), adapter_name="b")
    pipe.set_adapters(["a", "b"], [1.0, 0.5])
    stacked = latents(pipe)
    pipe.set_adapters(["a"], [1.0])
    assert (stacked - latents(pipe)).abs().max() > 1e-3  # B acts in the stack
    pipe.delete_adapters(["a", "b"])
    pipe.load_lora_weights(str(merged), adapter_name="merged")
    from_merge = latents(pipe)
    assert torch.allclose(from_merge, stacked, atol=1e-4), (from_merge - stacked).abs().max()


def test_flux_loras_convert_losslessly_and_never_to_kohyas_fused_layout(trained, flux, tmp_path):
    source = trained / "a.safetensors"
    comfy = convert_lora_file(source, tmp_path / "comfy.safetensors", "comfyui")
    with safe_open(str(source), framework="pt") as a, safe_open(str(comfy), framework="pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(key), b.get_tensor(key)) for key in a.keys())
    with pytest.raises(LoraFileError, match="kohya's FLUX layout"):
        convert_lora_file(source, tmp_path / "kohya.safetensors", "kohya")
    assert not (tmp_path / "kohya.safetensors").exists()


def test_generate_image_renders_flux_with_a_lora_at_its_strength(trained, tmp_path):
    def pixels(name: str, *loras: LoraUse) -> np.ndarray:
        request = GenerationRequest(model_name="builtin:tiny-flux", prompt=PROMPT, steps=2, loras=list(loras))
        [path] = generate(request, tmp_path / name)
        return np.asarray(Image.open(path), dtype=np.int16)

    lora = str(trained / "a.safetensors")
    base = pixels("base")
    assert np.array_equal(pixels("zero", LoraUse(path=lora, strength_model=0.0)), base)
    assert np.abs(pixels("one", LoraUse(path=lora, strength_model=1.0)) - base).mean() > 0.5


# --- 8-bit base weights ---------------------------------------------------------------------------


# torchao lives beside the test environment (see the Makefile): installed into it, every diffusers import would
# log warnings about its compiled kernels. So the 8-bit run is a trainer process with torchao on its path.
TORCHAO = Path(__file__).resolve().parent.parent / ".venv" / "extras" / "torchao"


def test_an_8bit_base_transformer_trains_a_full_precision_lora(tmp_path, shapes, flux):
    import os
    import subprocess
    import sys

    assert TORCHAO.is_dir(), f"make setup installs torchao into {TORCHAO} for this test"
    config = fast_config(shapes, model_name="builtin:tiny-flux", steps=3, learning_rate=5e-2, quantize_base="8bit")
    (tmp_path / "flux8.yaml").write_text(config.to_yaml())
    done = subprocess.run(
        [sys.executable, "-m", "training.cli", str(tmp_path / "flux8.yaml"), "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(TORCHAO)},
        cwd=Path(__file__).resolve().parent.parent,
    )
    log = (tmp_path / "run" / "train.log").read_text()
    assert done.returncode == 0, log[-2000:] + done.stderr[-2000:]
    assert "frozen transformer weights in 8 bits (torchao)" in log
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in rows if r.get("kind") == "lora_update"]
    assert updates and updates[-1]["mean_ratio"] > 0 and math.isfinite(updates[-1]["max_ratio"])  # vs int8 W
    weights = read_lora_file(tmp_path / "run" / "test-run.safetensors", flux.lora_models)  # fits the full model
    assert len(weights) == 17 and all(w.up.abs().max() > 0 for w in weights.values())  # every layer trained


def test_8bit_weights_without_a_quantization_library_fail_with_what_to_install(tmp_path, shapes, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("torchao", "bitsandbytes") else real_find_spec(name, *a),
    )
    config = fast_config(shapes, model_name="builtin:tiny-flux", quantize_base="8bit")
    result = run_training(config, tmp_path / "run")
    assert result.state == "failed"
    assert "needs bitsandbytes (CUDA: pip install bitsandbytes) or torchao" in result.error


def test_frozen_weights_load_in_the_mixed_precision_type_where_the_device_runs_it():
    from training.models.loading import frozen_dtypes

    assert frozen_dtypes("bf16", "cuda", "flux") == {"default": torch.bfloat16}
    # fp16 overflows in SD/SDXL VAEs and in T5's activations: those two stay fp32
    assert frozen_dtypes("fp16", "cuda", "flux") == {
        "default": torch.float16,
        "vae": torch.float32,
        "text_encoder_2": torch.float32,
    }
    assert frozen_dtypes("fp16", "cuda", "sdxl") == {"default": torch.float16, "vae": torch.float32}
    assert frozen_dtypes("bf16", "cpu", "flux") == {"default": torch.bfloat16}  # CPU autocast runs bf16 too
    assert frozen_dtypes("bf16", "xpu", "flux") == frozen_dtypes("no", "cuda", "sd1") == {"default": torch.float32}


def test_a_bf16_request_on_the_cpu_loads_bf16_weights(flux):
    base = load_base_model(resolve_model("builtin:tiny-flux"), torch.device("cpu"), mixed_precision="bf16")
    dtypes = {
        name: next(m.parameters()).dtype for name, m in base.pipeline.components.items() if hasattr(m, "parameters")
    }
    assert set(dtypes.values()) == {torch.bfloat16} and len(dtypes) == 4  # transformer, VAE, CLIP, T5


def test_low_vram_keeps_static_text_encoders_off_the_gpu(flux):
    from training.models.loading import frozen_dtypes
    from training.placement import text_encoders_stay_on_cpu

    cuda = torch.device("cuda")  # only its type is read: no GPU is needed to decide
    config = TrainingConfig(name="x", dataset_path="/d", low_vram=True)
    assert text_encoders_stay_on_cpu(config, cuda)
    assert not text_encoders_stay_on_cpu(config, torch.device("cpu"))
    assert not text_encoders_stay_on_cpu(config.model_copy(update={"shuffle_captions": True}), cuda)  # per step
    assert not text_encoders_stay_on_cpu(config.model_copy(update={"low_vram": False}), cuda)
    # On the CPU they keep fp32 under fp16 (no fast fp16 there); bf16 they keep.
    assert frozen_dtypes("fp16", "cuda", "flux", text_on_cpu=True)["text_encoder"] == torch.float32
    assert "text_encoder" not in frozen_dtypes("bf16", "cuda", "flux", text_on_cpu=True)
    # The part-by-part placement the loader uses then.
    base = load_base_model(resolve_model("builtin:tiny-flux"), torch.device("cpu"), text_on_cpu=True)
    assert {m.device.type for m in base.pipeline.components.values() if isinstance(m, torch.nn.Module)} == {"cpu"}


def test_kohya_files_that_do_not_fit_flux_are_refused_with_their_keys(flux, tmp_path):
    """kohya FLUX files are read through diffusers (tests/test_foreign_loras.py); one whose shapes do not fit,
    or a kohya SD file, is refused with the file's name and keys."""
    from safetensors.torch import save_file

    def kohya(name: str, module: str) -> Path:
        path = tmp_path / f"{name}.safetensors"
        save_file(
            {f"{module}.lora_down.weight": torch.zeros(2, 4), f"{module}.lora_up.weight": torch.zeros(4, 2)}, path
        )
        return path

    with pytest.raises(LoraFileError, match="bfl.safetensors: .*Its keys: lora_unet_double_blocks_0_img_attn_qkv"):
        read_lora_file(kohya("bfl", "lora_unet_double_blocks_0_img_attn_qkv"), flux.lora_models)
    with pytest.raises(LoraFileError, match="sd.safetensors: .*Its keys: lora_unet_down_blocks_0_attentions_0_proj_in"):
        read_lora_file(kohya("sd", "lora_unet_down_blocks_0_attentions_0_proj_in"), flux.lora_models)


def test_a_flux_lora_of_another_tool_with_clip_weights_converts_and_merges(trained, tmp_path):
    """diffusers' FLUX script with --train_text_encoder also adapts CLIP: such files convert and merge whole."""
    from safetensors.torch import save_file

    with safe_open(str(trained / "a.safetensors"), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata()
    clip = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    tensors |= {
        f"{clip}.lora_A.weight": torch.randn(4, 32),
        f"{clip}.lora_B.weight": torch.randn(32, 4),
        f"{clip}.alpha": torch.tensor(2.0),
    }
    source = tmp_path / "with-clip.safetensors"
    save_file(tensors, str(source), metadata=metadata)
    converted = convert_lora_file(source, tmp_path / "converted.safetensors", "comfyui")
    merged = merge_lora_files([(source, 1.0), (trained / "a.safetensors", 0.5)], tmp_path / "merged.safetensors")
    for path in (converted, merged):
        with safe_open(str(path), framework="pt") as f:
            assert f"{clip}.lora_A.weight" in f.keys() and f"{clip}.alpha" in f.keys()
    with safe_open(str(converted), framework="pt") as f:
        assert torch.equal(f.get_tensor(f"{clip}.lora_B.weight"), tensors[f"{clip}.lora_B.weight"])


def test_a_schnell_like_model_trains_without_a_guidance_input(tmp_path, shapes, flux):
    """FLUX.1-schnell has no guidance embedding: no guidance input, 256 T5 tokens, flux-1-schnell metadata."""
    import shutil

    from diffusers import FluxTransformer2DModel

    folder = tmp_path / "tiny-schnell"
    shutil.copytree(flux.source.path, folder)
    config = dict(FluxTransformer2DModel.load_config(str(folder / "transformer")))
    shutil.rmtree(folder / "transformer")
    torch.manual_seed(0)
    FluxTransformer2DModel.from_config({**config, "guidance_embeds": False}).save_pretrained(folder / "transformer")
    schnell = load_base_model(resolve_model(str(folder)), torch.device("cpu"))
    assert not schnell.guidance_embedded
    assert encode_text(schnell, [PROMPT], max_token_length=75, clip_skip=1).states.shape[1] == 256

    result = run_training(fast_config(shapes, model_name=str(folder), steps=2, learning_rate=5e-2), tmp_path / "run")
    assert result.state == "completed", result.error
    with safe_open(str(result.lora_path), framework="pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-schnell/lora"
