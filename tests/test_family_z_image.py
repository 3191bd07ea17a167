"""Z-Image on the built-in tiny ZImagePipeline: recognised from its folder and from a ComfyUI-layout single file,
Qwen3 captions of their own lengths as ZImagePipeline encodes them, a training forward pass that is the
pipeline's own denoising step (timestep 1 - sigma, output negated), training that lowers the loss on the
training images, and a LoRA file (`transformer.` names, alpha folded into lora_B) that ComfyUI's Z-Image mapping
accepts, that ZImagePipeline loads (strength 0: the base exactly), and that renders, merges and converts."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import family_checks as checks
import pytest
import torch
from conftest import fast_config
from family_checks import PROMPT
from safetensors.torch import save_file

from training.config import TrainingConfig
from training.families import FAMILIES, checkpoint_family, guess_family
from training.families.z_image import ZImageFlow, caption_states
from training.lora import read_lora_file
from training.models.loading import load_base_model
from training.models.source import resolve_model
from training.prompts import encode_text
from training.trainer import run_training

MODEL = "builtin:tiny-z-image"

# ComfyUI's Z-Image LoRA mapping (Comfy-Org/ComfyUI comfy/lora.py model_lora_keys_unet, the Lumina2 branch, with
# comfy/utils.py z_image_to_diffusers): keys `transformer.<d>` (also `diffusion_model.<d>`, bare `<d>`) for these
# diffusers module names <d>, per block of `layers`, `noise_refiner` and `context_refiner` (the caption refiners
# have no adaLN_modulation); to_q/to_k/to_v are mapped onto slices of the fused attention.qkv.
COMFYUI_PREFIX = "transformer."
COMFYUI_BLOCKS = ("layers", "noise_refiner", "context_refiner")
COMFYUI_BLOCK_MODULES = (
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
    "adaLN_modulation.0",
)


def comfyui_maps(module: str) -> bool:
    block, index, rest = module.split(".", 2)
    return block in COMFYUI_BLOCKS and index.isdigit() and rest in COMFYUI_BLOCK_MODULES


zimage = checks.base_model(MODEL)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, zimage) -> Path:
    return checks.train(
        tmp_path_factory.mktemp("zimage"),
        "a",
        MODEL,
        steps=5,
        **checks.sampling(every=5),
        sample_guidance_scale=4.0,  # the base model's guidance: the negative prompt's states go in too
        validation_split=0.34,
        validation_every=5,
    )


@pytest.fixture(scope="module")
def second(tmp_path_factory, zimage) -> Path:
    # Captions of several lengths, cached on disk with their masks.
    options = dict(seed=7, steps=2, timestep_sampling="uniform", cache_text_encoder_outputs_to_disk=True)
    return checks.train(tmp_path_factory.mktemp("zimage-b"), "b", MODEL, **options)


latents = functools.partial(checks.latents, guidance_scale=0.0)


def objective(model) -> ZImageFlow:
    return FAMILIES["z_image"].objective(model, TrainingConfig(name="x", dataset_path="/d"))


# --- recognising it ---------------------------------------------------------------------------------


def comfyui_single_file(zimage, path: Path) -> Path:
    """The tiny transformer in ComfyUI's layout (as Z-Image's released single files): `model.diffusion_model.`,
    the fused attention.qkv, attention.out, q_norm/k_norm, x_embedder and final_layer."""
    state = {}
    for key, value in zimage.denoiser.state_dict().items():
        key = key.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
        key = key.replace(".attention.to_out.0.", ".attention.out.").replace(".attention.norm_q.", ".attention.q_norm.")
        state[key.replace(".attention.norm_k.", ".attention.k_norm.")] = value.clone()
    for key in [k for k in state if k.endswith(".attention.to_q.weight")]:
        stem = key.removesuffix(".to_q.weight")
        parts = [state.pop(f"{stem}.{p}.weight") for p in ("to_q", "to_k", "to_v")]
        state[f"{stem}.qkv.weight"] = torch.cat(parts)
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, str(path))
    return path


def test_the_folder_and_a_comfyui_single_file_are_recognised_as_z_image(zimage, tmp_path):
    checks.assert_built_in_recognised(zimage, "z_image")
    assert guess_family("Tongyi-MAI/Z-Image-Turbo", None).id == "z_image"
    assert guess_family("z_image_turbo_bf16.safetensors", 1024).id == "z_image"

    single = comfyui_single_file(zimage, tmp_path / "z_image_turbo_tiny.safetensors")
    assert checkpoint_family(single) == "z_image"
    refusal = FAMILIES["z_image"].refusal(resolve_model(str(single)))
    assert "holds the transformer only: set base_model_config" in refusal


def test_a_comfyui_single_file_loads_as_the_folders_transformer(zimage, tmp_path):
    single = comfyui_single_file(zimage, tmp_path / "z_image_tiny.safetensors")
    loaded = load_base_model(resolve_model(str(single), str(zimage.source.path)), torch.device("cpu"))
    theirs, ours = zimage.denoiser.state_dict(), loaded.denoiser.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)


# --- captions and the forward pass -------------------------------------------------------------------


def test_captions_are_encoded_as_zimagepipeline_encodes_them_padded_with_a_mask(zimage):
    prompts = [PROMPT, "a blue square on a white background, flat colours"]
    ours = encode_text(zimage, prompts, max_token_length=75, clip_skip=1)
    theirs, _ = zimage.pipeline.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=False)
    lengths = [len(t) for t in theirs]
    assert lengths[0] < lengths[1] and ours.states.shape == (2, lengths[1], 32) and ours.pooled is None
    assert ours.mask.sum(dim=1).tolist() == lengths
    assert all(torch.equal(a, b) for a, b in zip(caption_states(ours.states, ours.mask), theirs))
    assert not ours.states[0, lengths[0] :].any()  # padding is zeros


def test_the_training_forward_pass_is_the_pipelines_denoising_step(zimage):
    """One Euler step of ZImagePipeline (no guidance) from noise at its first sigma lands at noisy - sigma *
    velocity, with the velocity our training forward pass predicts for a batch of two captions of different
    lengths: the frames, the timestep 1 - sigma, the per-caption states and the sign agree."""
    pipe, flow = zimage.pipeline, objective(zimage)
    prompts = [PROMPT, "a blue square on a white background, flat colours"]
    text = encode_text(zimage, prompts, max_token_length=75, clip_skip=1)
    noisy = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stepped = pipe(
            prompt_embeds=caption_states(text.states, text.mask),
            latents=noisy,
            sigmas=[0.6],  # shifted by the scheduler's 3: 0.818, a timestep of 0.182
            num_inference_steps=1,
            guidance_scale=0.0,
            height=64,
            width=64,
            output_type="latent",
        ).images
        sigma = pipe.scheduler.sigmas[0]
        velocity = flow.predict(noisy, sigma.expand(2), checks.text_batch(text.states, text.mask), torch.float32)
    assert 0.8 < float(sigma) < 0.85
    assert torch.allclose(stepped, noisy - sigma * velocity, atol=1e-5)


# --- training, the file, and diffusers ------------------------------------------------------------------


def training_loss(model, data: Path) -> float:
    """The objective's loss on the training images and their captions."""
    pixels, captions = checks.training_images(data)
    with torch.no_grad():
        x0 = model.family_rules.encode_latents(model.vae, pixels, None)
        text = encode_text(model, captions, max_token_length=75, clip_skip=1)
    return checks.flow_loss(objective(model), x0, checks.text_batch(text.states, text.mask))


def test_training_lowers_the_loss_on_the_training_images(trained):
    model = load_base_model(resolve_model(MODEL), torch.device("cpu"))
    base = training_loss(model, trained.parent / "data")
    model.pipeline.load_lora_weights(str(trained / "a.safetensors"), adapter_name="a")
    assert training_loss(model, trained.parent / "data") < 0.97 * base


def test_the_lora_file_names_real_layers_with_alpha_folded_in_as_comfyui_maps_them(trained, zimage):
    lora = trained / "a.safetensors"
    tensors, metadata = checks.read_tensors(lora)
    assert metadata["ss_base_model_version"] == "z_image"
    assert metadata["modelspec.architecture"] == "z-image-turbo/lora"  # the tiny model has Turbo's shift 3
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "2")  # kept for kohya-style readers
    assert "lora_adapter_metadata" not in metadata
    assert json.loads(metadata["training_config"])["output_format"] == "diffusers"

    assert all(key.startswith(COMFYUI_PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight")) for key in tensors)
    modules = {key.removeprefix(COMFYUI_PREFIX).rsplit(".", 2)[0] for key in tensors}
    linear = checks.linear_layers(zimage.denoiser)
    assert modules <= linear and len(tensors) == 2 * len(modules)
    assert len(modules) == 4 * (2 + 1 + 1)  # q, k, v, out of 2 main blocks and one of each refiner
    assert {m.split(".")[0] for m in modules} == set(COMFYUI_BLOCKS)
    assert all(comfyui_maps(m) for m in modules), sorted(m for m in modules if not comfyui_maps(m))
    weights = read_lora_file(lora, {"transformer": zimage.denoiser})  # folded: read back at alpha = rank
    assert {w.alpha for w in weights.values()} == {4.0} and len(weights) == len(modules)


def test_zimagepipeline_loads_the_lora_and_strength_0_is_the_base_exactly(trained, zimage):
    pipe = checks.diffusers_pipeline(zimage)
    base = latents(pipe)
    pipe.load_lora_weights(str(trained / "a.safetensors"), adapter_name="trained")
    assert pipe.transformer.layers[0].attention.to_q.scaling["trained"] == 1.0  # alpha / rank is in lora_B
    checks.assert_changes_and_strength_0_is_base(pipe, latents, base, "trained")


def test_a_run_samples_with_guidance_and_records_its_losses(trained):
    checks.assert_run_records(trained, steps=5)  # sampled with the base model's guidance 4


def test_an_ai_toolkit_file_with_alphas_reads_at_its_scale(zimage, tmp_path):
    """ai-toolkit writes `diffusion_model.<module>` with `.alpha` tensors; diffusers' Z-Image reader folds the
    alphas in, so it reads back at alpha = rank with the same change of the weight."""
    down, up, module = torch.randn(4, 32), torch.randn(32, 4), "layers.0.attention.to_q"
    tensors = {f"diffusion_model.{module}.lora_A.weight": down, f"diffusion_model.{module}.lora_B.weight": up}
    save_file(tensors | {f"diffusion_model.{module}.alpha": torch.tensor(2.0)}, str(tmp_path / "ait.safetensors"))
    [(name, read)] = read_lora_file(tmp_path / "ait.safetensors", {"transformer": zimage.denoiser}).items()
    assert name == f"transformer.{module}" and read.alpha == 4.0
    assert torch.allclose(read.up @ read.down, 0.5 * up @ down, atol=1e-5)  # alpha 2 / rank 4


# --- merge, convert, generate ---------------------------------------------------------------------------


def test_two_z_image_loras_merged_equal_them_stacked(trained, second, zimage, tmp_path):
    a, b = trained / "a.safetensors", second / "b.safetensors"
    merged = checks.assert_merged_equals_stacked(checks.diffusers_pipeline(zimage), latents, a, b, tmp_path, acts=1e-4)
    assert all(key.startswith("transformer.") and not key.endswith(".alpha") for key in checks.read_tensors(merged)[0])


def test_z_image_loras_convert_losslessly_and_never_to_kohyas_layout(trained, tmp_path):
    checks.assert_converts_losslessly_and_never_to_kohya(trained / "a.safetensors", tmp_path, "kohya's Z-Image layout")


def test_generate_image_renders_z_image_with_a_lora_at_its_strength(trained, tmp_path):
    checks.assert_renders_at_its_strengths(MODEL, trained / "a.safetensors", tmp_path)  # at Turbo's guidance 0


# --- what the guide and the plans say ------------------------------------------------------------------


def test_options_that_do_not_fit_z_image_are_refused_or_warned(tmp_path, shapes, zimage):
    errors, _ = checks.conflicts("z_image", train_text_encoder=True, min_snr_gamma=5.0, output_format="kohya")
    assert len(errors) == 3 and "Z-Image LoRAs train the transformer only" in errors[0]
    _, warnings = checks.conflicts("z_image", model_name="Tongyi-MAI/Z-Image-Turbo", clip_skip=2)
    assert "no effect" in warnings[0] and "distilled" in warnings[1] and "Tongyi-MAI/Z-Image," in warnings[1]
    assert checks.conflicts("z_image", model_name="Tongyi-MAI/Z-Image") == ([], [])
    result = run_training(fast_config(shapes, model_name=MODEL, train_text_encoder=True), tmp_path / "run")
    assert result.state == "failed" and "Z-Image LoRAs train the transformer only" in result.error


def test_turbo_is_told_by_the_schedulers_shift_where_the_files_are_here(zimage, tmp_path):
    """The tiny model has Turbo's shift 3: a copy of it under any name is warned about; with the base model's
    shift 6, even a folder named Turbo is not. Without the files, the name decides."""
    import shutil

    folder = shutil.copytree(zimage.source.path, tmp_path / "my-finetune", symlinks=True)
    _, warnings = checks.conflicts("z_image", model_name=str(folder))
    assert len(warnings) == 1 and "is Z-Image-Turbo" in warnings[0]

    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps(json.loads(scheduler.read_text()) | {"shift": 6.0}))
    base = folder.rename(tmp_path / "z-image-turbo-but-retrained")
    assert checks.conflicts("z_image", model_name=str(base)) == ([], [])
    assert checks.conflicts("z_image", model_name="x.safetensors", base_model_config=str(base)) == ([], [])
    _, warnings = checks.conflicts("z_image", model_name="owner/z-image-turbo-not-downloaded")
    assert "is Z-Image-Turbo" in warnings[0]


def test_the_plan_for_z_image_trains_in_bf16_with_adamw_and_the_readme_config_fits():
    recommended = checks.plan("Tongyi-MAI/Z-Image", 1024, detected_family="z_image")
    assert (recommended.config["optimizer"], recommended.config["mixed_precision"]) == ("adamw", "bf16")
    assert "quantize_base" not in recommended.config and "Z-Image" in recommended.reasons["model_name"]
    readme = checks.example("z-image.yaml")
    assert readme.family_conflicts("z_image") == ([], [])
    resolved = readme.resolve(native_resolution=1024, num_images=20, family="z_image")
    assert resolved.output_format == "diffusers" and resolved.sample_guidance_scale == 4.0
    turbo = TrainingConfig(name="x", dataset_path="/d", model_name="Tongyi-MAI/Z-Image-Turbo")
    assert turbo.resolve(native_resolution=1024, num_images=20, family="z_image").sample_guidance_scale == 0.0
