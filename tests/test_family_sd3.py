"""SD 3.5 on the built-in tiny StableDiffusion3Pipeline: recognised from its folder and single-file kinds,
captions encoded as the pipeline encodes them (T5 optional), a training forward pass that is the pipeline's
own denoising step, a LoRA whose loss on the training images is below the base's, written with alpha folded
into `transformer.` names that ComfyUI maps and StableDiffusion3Pipeline loads (strength 0 is the base
exactly), and that merges, converts and renders through generate-image."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import family_checks as checks
import pytest
import torch
from family_checks import ALPHA, PROMPT, RANK
from safetensors.torch import save_file

from training.config import TrainingConfig
from training.families import FAMILIES, checkpoint_family, guess_family
from training.families.sd3 import SD3, SD3Flow
from training.lora import read_lora_file
from training.models.loading import load_base_model
from training.models.source import resolve_model
from training.prompts import encode_text

MODEL = "builtin:tiny-sd35"

# What ComfyUI maps of an SD 3.5 LoRA in the diffusers layout: comfy/lora.py `model_lora_keys_unet` (its
# model_base.SD3 branch) prefixes `transformer.` to every diffusers name that comfy/utils.py `mmdit_to_diffusers`
# lists for a block (Comfy-Org/ComfyUI; research report §4.1); the text encoders come from
# `model_lora_keys_clip` (`text_encoder.` CLIP-L, `text_encoder_2.` CLIP-G, as `text_model.encoder.layers.N.*`).
COMFYUI_SD3_PREFIX = "transformer."
COMFYUI_SD3_BLOCK_MODULES = {
    *(f"attn.{name}" for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")),
    "attn.to_add_out",
    *(f"attn2.{name}" for name in ("to_q", "to_k", "to_v", "to_out.0")),
    *("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear"),
}
COMFYUI_CLIP_MODULES = {f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")} | {"mlp.fc1", "mlp.fc2"}


def comfyui_maps(key: str, blocks: int) -> bool:
    """Whether ComfyUI's SD3 tables name the module of a `<prefix>.<module>.lora_A/B.weight` key."""
    module = key.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight")
    if module.startswith(COMFYUI_SD3_PREFIX + "transformer_blocks."):
        index, _, name = module.removeprefix(COMFYUI_SD3_PREFIX + "transformer_blocks.").partition(".")
        return int(index) < blocks and name in COMFYUI_SD3_BLOCK_MODULES
    for encoder in ("text_encoder.", "text_encoder_2."):
        if module.startswith(encoder + "text_model.encoder.layers."):
            return module.split(".", 5)[-1] in COMFYUI_CLIP_MODULES
    return False


sd3 = checks.base_model(MODEL)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sd3) -> Path:
    """A LoRA of the transformer and both CLIPs."""
    return checks.train(tmp_path_factory.mktemp("sd3"), "a", MODEL, train_text_encoder=True)


@pytest.fixture(scope="module")
def lora_pipe(trained, sd3):
    """StableDiffusion3Pipeline with the trained LoRA loaded as adapter "a", and its base render."""
    pipe = checks.diffusers_pipeline(sd3)
    base = checks.latents(pipe)
    pipe.load_lora_weights(str(trained / "a.safetensors"), adapter_name="a")
    return pipe, base


# --- recognising it -------------------------------------------------------------------------------


def test_the_tiny_folder_and_sd3_single_files_are_recognised(sd3, tmp_path):
    checks.assert_built_in_recognised(sd3, "sd3")  # latent size 8 x VAE 8; 8 x patch 2
    assert (sd3.native_resolution, sd3.bucket_step) == (64, 16)

    # diffusers' single-file kinds, told by key names and shapes (pos_embed: 192^2 or 384^2 patches).
    checkpoints = {
        "sd3": {"joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,), "pos_embed": (1, 36864, 1)},
        "sd35_medium": {"joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,), "pos_embed": (1, 147456, 1)},
        "sd35_large": {"joint_blocks.37.x_block.mlp.fc1.weight": (1, 1)},
    }
    for kind, shapes in checkpoints.items():
        path = tmp_path / f"{kind}.safetensors"
        save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, str(path))
        assert checkpoint_family(path) == "sd3", kind
    assert not FAMILIES["flux"].recognises_checkpoint("sd35_large")
    refusal = SD3.refusal(resolve_model(str(tmp_path / "sd35_large.safetensors")))
    assert refusal is not None and "base_model_config" in refusal

    assert guess_family("stabilityai/stable-diffusion-3.5-large", None) is SD3
    assert guess_family("my-sd3.5-medium-finetune", 1024) is SD3
    assert guess_family("stabilityai/stable-diffusion-xl-base-1.0", None).id == "sdxl"


def test_medium_and_large_are_told_apart_by_their_blocks(sd3):
    def architecture(**config) -> str:
        denoiser = type("Transformer", (), {"config": type("Config", (), config)})
        return SD3.modelspec_architecture(type("Model", (), {"denoiser": denoiser}))

    assert SD3.modelspec_architecture(sd3) == "stable-diffusion-3-5-medium"  # the tiny one has a dual block
    assert architecture(dual_attention_layers=(), qk_norm="rms_norm") == "stable-diffusion-3-5-large"
    assert architecture(dual_attention_layers=(), qk_norm=None) == "stable-diffusion-3-medium"


# --- conditioning and the objective ---------------------------------------------------------------


def test_prompts_are_encoded_as_the_pipeline_encodes_them(sd3):
    prompts = [PROMPT, "a blue square on white"]
    ours = encode_text(sd3, prompts, max_token_length=75, clip_skip=1)
    states, _, pooled, _ = sd3.pipeline.encode_prompt(
        prompts, None, None, device=torch.device("cpu"), do_classifier_free_guidance=False, max_sequence_length=256
    )
    assert torch.equal(ours.states, states) and torch.equal(ours.pooled, pooled)
    assert ours.states.shape == (2, 77 + 256, 64) and ours.pooled.shape == (2, 64)  # CLIPs' 77, T5's 256
    assert ours.mask is None


def test_the_training_forward_pass_is_the_pipelines_denoising_step(sd3):
    """One Euler step of StableDiffusion3Pipeline from pure noise (sigma 1 -> 0) lands at noise - velocity, with
    the velocity our training forward pass predicts: the timestep scale and the conditioning agree."""
    sampler = SD3Flow(sd3, TrainingConfig(name="x", dataset_path="/d"))
    text = encode_text(sd3, [PROMPT], max_token_length=75, clip_skip=1)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batch = checks.text_batch(text.states, pooled=text.pooled)
        velocity = sampler.predict(noise, torch.ones(1), batch, torch.float32)
        stepped = sd3.pipeline(
            prompt_embeds=text.states,
            pooled_prompt_embeds=text.pooled,
            latents=noise,
            sigmas=[1.0],
            num_inference_steps=1,
            guidance_scale=1.0,  # no classifier-free guidance: the plain velocity
            height=64,
            width=64,
            output_type="latent",
        ).images
    assert torch.allclose(stepped, noise - velocity, atol=1e-5)
    assert sampler.shift(tokens=16) == 3.0  # the scheduler's own shift, not resolution-dependent


def test_t5_is_optional(sd3, tmp_path):
    """A folder without text_encoder_3 (SD 3.5 run without T5) loads and encodes T5's part as zeros."""
    folder = tmp_path / "no-t5"
    shutil.copytree(sd3.source.path, folder, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    model = load_base_model(resolve_model(str(folder)), torch.device("cpu"))
    assert model.family == "sd3" and model.pipeline.text_encoder_3 is None
    text = encode_text(model, [PROMPT], max_token_length=75, clip_skip=1)
    with_t5 = encode_text(sd3, [PROMPT], max_token_length=75, clip_skip=1)
    assert torch.equal(text.states[:, :77], with_t5.states[:, :77]) and torch.equal(text.pooled, with_t5.pooled)
    assert text.states.shape == with_t5.states.shape and not text.states[:, 77:].any()


# --- training, the file, and diffusers ------------------------------------------------------------


def test_the_lora_is_written_as_comfyui_and_diffusers_map_it(trained, sd3):
    tensors, metadata = checks.read_tensors(trained / "a.safetensors")
    assert metadata["ss_base_model_version"] == "sd3"
    assert metadata["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (str(RANK), str(ALPHA))
    assert "lora_adapter_metadata" not in metadata  # alpha is folded: no adapter config, no `.alpha`
    assert json.loads(metadata["training_config"])["output_format"] == "diffusers"

    assert all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in tensors)
    modules = {key.rsplit(".", 2)[0] for key in tensors}
    assert len(tensors) == 2 * len(modules)
    assert {m.split(".", 1)[0] for m in modules} == {"transformer", "text_encoder", "text_encoder_2"}  # never T5
    linear = {f"transformer.{name}" for name in checks.linear_layers(sd3.denoiser)}
    ours = {m for m in modules if m.startswith("transformer.")}
    assert ours <= linear  # every key names a real layer
    assert {"transformer.transformer_blocks.0.attn2.to_q", "transformer.transformer_blocks.1.attn.add_k_proj"} <= ours
    assert not any(".ff" in m or ".norm" in m for m in ours) and "transformer.proj_out" not in ours
    unmapped = [key for key in tensors if not comfyui_maps(key, blocks=2)]
    assert unmapped == []

    # Read back (the CLIP names too), a folded file is alpha = rank: scale 1, its B carries alpha / rank.
    weights = read_lora_file(trained / "a.safetensors", sd3.lora_models)
    assert len(weights) == len(modules) and {w.alpha for w in weights.values()} == {float(RANK)}
    # Every layer trained, the CLIPs' too, but the last block's text queries: that block drops its text outputs.
    untrained = {name for name, w in weights.items() if not w.up.abs().max() > 0}
    assert untrained == {"transformer.transformer_blocks.1.attn.add_q_proj"}


def test_the_trained_lora_lowers_the_loss_on_the_training_images(trained, lora_pipe, sd3):
    pixels, captions = checks.training_images(trained.parent / "data")
    pipe, _ = lora_pipe
    model = dataclasses.replace(sd3, pipeline=pipe)
    sampler = SD3Flow(model, TrainingConfig(name="x", dataset_path="/d"))
    with torch.no_grad():
        x0 = SD3.encode_latents(pipe.vae, pixels, None)

    def loss(strength: float) -> float:
        pipe.set_adapters(["a"], [strength])
        with torch.no_grad():
            text = encode_text(model, captions, max_token_length=75, clip_skip=1)  # through the CLIPs' LoRA
        return checks.flow_loss(sampler, x0, checks.text_batch(text.states, pooled=text.pooled))

    base, tuned = loss(0.0), loss(1.0)
    assert tuned < 0.95 * base, (base, tuned)


def test_the_lora_loads_in_diffusers_changes_the_image_and_is_the_base_at_strength_0(lora_pipe):
    pipe, base = lora_pipe
    # alpha folded into B: diffusers' scale is 1 on every adapted model, the CLIPs too
    assert pipe.transformer.transformer_blocks[0].attn.to_q.scaling["a"] == 1.0
    assert pipe.text_encoder_2.text_model.encoder.layers[0].self_attn.q_proj.scaling["a"] == 1.0
    checks.assert_changes_and_strength_0_is_base(pipe, checks.latents, base, "a")


# --- merge, convert, generate ---------------------------------------------------------------------


def test_two_sd3_loras_merged_equal_them_stacked(trained, sd3, tmp_path):
    a = trained / "a.safetensors"
    b = checks.with_other_up_weights(a, tmp_path / "b.safetensors", scale=0.1)
    merged = checks.assert_merged_equals_stacked(checks.diffusers_pipeline(sd3), checks.latents, a, b, tmp_path)
    tensors, metadata = checks.read_tensors(merged)
    assert not any(key.endswith(".alpha") for key in tensors) and "lora_adapter_metadata" not in metadata


def test_sd3_loras_convert_losslessly_and_never_to_kohyas_layout(trained, tmp_path):
    checks.assert_converts_losslessly_and_never_to_kohya(trained / "a.safetensors", tmp_path, "kohya's SD 3.5 layout")


def test_generate_image_renders_sd3_with_a_lora_at_its_strength(trained, tmp_path):
    checks.assert_renders_at_its_strengths(MODEL, trained / "a.safetensors", tmp_path)


# --- the guide's side: checks.conflicts, plans, the README example --------------------------------------


def test_options_that_do_not_fit_sd3_are_refused_or_warned():
    assert checks.conflicts("sd3", model_name=MODEL, train_text_encoder=True) == ([], [])  # the two CLIPs take a LoRA
    errors, _ = checks.conflicts("sd3", model_name=MODEL, min_snr_gamma=5.0, output_format="kohya")
    assert len(errors) == 2 and "flow matching" in errors[0] and "kohya" in errors[1]
    _, warnings = checks.conflicts("sd3", model_name=MODEL, clip_skip=2, max_token_length=150)
    assert len(warnings) == 2 and "penultimate" in warnings[0] and "256 tokens" in warnings[1]


def test_recommend_training_plan_gives_sd3_its_defaults():
    recommended = checks.plan("stabilityai/stable-diffusion-3.5-medium", 1024)
    assert recommended.config["mixed_precision"] == "bf16" and recommended.config["optimizer"] == "adamw"
    assert recommended.config.get("quantize_base", "none") == "none"
    assert "SD 3.5" in recommended.reasons["model_name"]
    assert recommended.estimated_minutes is not None


def test_the_readme_example_config_validates():
    config = checks.example("sd35.yaml")
    assert config.model_name == "stabilityai/stable-diffusion-3.5-medium"
    assert SD3.conflicts(config) == ([], [])
