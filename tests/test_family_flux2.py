"""FLUX.2 on the built-in tiny Flux2Pipeline: recognised from its folder and from a single file in BFL's layout,
[klein] and a PixtralProcessor without torchvision refused with their reasons, latents in batch-normalised 2x2
patches and Mistral captions as Flux2Pipeline makes them, a training forward pass that is the pipeline's own
denoising step, training that lowers the loss on the training images, and a LoRA file (`transformer.` names,
alpha folded into lora_B) that ComfyUI's Flux mapping accepts, that Flux2Pipeline loads (strength 0: the base
exactly), and that renders, merges and converts."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import family_checks as checks
import pytest
import torch
from family_checks import ALPHA, PROMPT, RANK
from safetensors.torch import save_file

from training.config import TrainingConfig
from training.estimates import estimate_vram_gb
from training.families import FAMILIES, checkpoint_family, detect_family, guess_family
from training.families.flux2 import Flux2Flow
from training.lora import read_lora_file
from training.models.loading import load_base_model
from training.models.source import ModelNotFoundError, ModelSource, resolve_model
from training.prompts import encode_text

MODEL = "builtin:tiny-flux2"

# ComfyUI's FLUX.2 LoRA mapping (Comfy-Org/ComfyUI comfy/lora.py model_lora_keys_unet: model_base.Flux2 subclasses
# Flux, so its Flux branch, with comfy/utils.py flux_to_diffusers; research §4.1): keys `transformer.<d>` (also bare
# `<d>`) for these diffusers module suffixes of each double block (transformer_blocks.N, onto BFL's double_blocks.N:
# to_q/k/v and add_q/k/v_proj as slices of img_attn.qkv and txt_attn.qkv) and single block
# (single_transformer_blocks.N: linear1 and linear2).
COMFYUI_FLUX2 = {
    "prefix": "transformer.",
    "transformer_blocks": {
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_out.0",
        "attn.to_add_out",
        "ff.linear_in",
        "ff.linear_out",
        "ff_context.linear_in",
        "ff_context.linear_out",
    },
    "single_transformer_blocks": {"attn.to_qkv_mlp_proj", "attn.to_out"},
}
# The inverse of diffusers' convert_flux2_transformer_checkpoint_to_diffusers (loaders/single_file_utils.py): BFL's
# names of the tiny transformer's tensors, whole names first, then per-block suffixes.
BFL_NAMES = {
    "x_embedder.weight": "img_in.weight",
    "context_embedder.weight": "txt_in.weight",
    "time_guidance_embed.timestep_embedder.linear_1.weight": "time_in.in_layer.weight",
    "time_guidance_embed.timestep_embedder.linear_2.weight": "time_in.out_layer.weight",
    "time_guidance_embed.guidance_embedder.linear_1.weight": "guidance_in.in_layer.weight",
    "time_guidance_embed.guidance_embedder.linear_2.weight": "guidance_in.out_layer.weight",
    "double_stream_modulation_img.linear.weight": "double_stream_modulation_img.lin.weight",
    "double_stream_modulation_txt.linear.weight": "double_stream_modulation_txt.lin.weight",
    "single_stream_modulation.linear.weight": "single_stream_modulation.lin.weight",
    "proj_out.weight": "final_layer.linear.weight",
}
BFL_DOUBLE = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "attn.to_out.0.weight": "img_attn.proj.weight",
    "attn.to_add_out.weight": "txt_attn.proj.weight",
    "ff.linear_in.weight": "img_mlp.0.weight",
    "ff.linear_out.weight": "img_mlp.2.weight",
    "ff_context.linear_in.weight": "txt_mlp.0.weight",
    "ff_context.linear_out.weight": "txt_mlp.2.weight",
}
BFL_SINGLE = {
    "attn.to_qkv_mlp_proj.weight": "linear1.weight",
    "attn.to_out.weight": "linear2.weight",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
}


flux2 = checks.base_model(MODEL)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, flux2) -> Path:
    return checks.train(
        tmp_path_factory.mktemp("flux2"),
        "a",
        MODEL,
        steps=5,
        learning_rate=0.1,  # twice family_checks' 5e-2, at which 5 steps lower the loss on the images by 2.6% only
        **checks.sampling(every=5),
        validation_split=0.34,
        validation_every=5,
    )


# PROMPT's states, encoded once: every pipeline here has the built-in's Mistral, which no LoRA adapts (31 layers over
# 512 tokens: most of a tiny render's time).
PROMPT_STATES: list[torch.Tensor] = []


def latents(pipe) -> torch.Tensor:
    """PROMPT rendered as family_checks.latents renders it, at FLUX.2's guidance 4."""
    if not PROMPT_STATES:
        PROMPT_STATES.append(pipe.encode_prompt(PROMPT, device="cpu")[0])
    generator = torch.Generator().manual_seed(0)
    options = dict(num_inference_steps=2, height=64, width=64, guidance_scale=4.0, output_type="latent")
    return pipe(prompt_embeds=PROMPT_STATES[0], generator=generator, **options).images


def objective(model) -> Flux2Flow:
    return FAMILIES["flux2"].objective(model, TrainingConfig(name="x", dataset_path="/d"))


# --- recognising it ---------------------------------------------------------------------------------


def bfl_single_file(flux2, path: Path) -> Path:
    """The tiny transformer in BFL's layout (as FLUX.2's released single files): fused qkv per stream, `lin`
    modulations, the final layer's (shift, scale) modulation in that order, `.scale` norms."""
    state, bfl = flux2.denoiser.state_dict(), {}
    for key, value in state.items():
        blocks, _, rest = key.partition(".")
        index, _, name = rest.partition(".")
        if key in BFL_NAMES:
            bfl[BFL_NAMES[key]] = value
        elif blocks == "transformer_blocks" and name in BFL_DOUBLE:
            bfl[f"double_blocks.{index}.{BFL_DOUBLE[name]}"] = value
        elif blocks == "single_transformer_blocks":
            bfl[f"single_blocks.{index}.{BFL_SINGLE[name]}"] = value
    scale, shift = state["norm_out.linear.weight"].chunk(2)
    bfl["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
    streams = {"img": ("to_q", "to_k", "to_v"), "txt": ("add_q_proj", "add_k_proj", "add_v_proj")}
    for block in range(len(flux2.denoiser.transformer_blocks)):
        for stream, names in streams.items():
            parts = [state[f"transformer_blocks.{block}.attn.{name}.weight"] for name in names]
            bfl[f"double_blocks.{block}.{stream}_attn.qkv.weight"] = torch.cat(parts)
    save_file({key: value.contiguous() for key, value in bfl.items()}, str(path))
    return path


def test_the_folder_and_a_bfl_single_file_are_recognised_as_flux2(flux2, tmp_path):
    checks.assert_built_in_recognised(flux2, "flux2")
    assert flux2.vae_scale_factor == 16  # 8 px per VAE latent x its 2x2 patches
    for name in ("black-forest-labs/FLUX.2-dev", "flux2-dev-fp8.safetensors", "flux-2-dev"):
        assert guess_family(name, None).id == "flux2", name
    for name in ("black-forest-labs/FLUX.1-dev", "flux1-schnell.safetensors", "ostris/Flex.1-alpha"):
        assert guess_family(name, None).id == "flux", name

    single = bfl_single_file(flux2, tmp_path / "flux2_tiny.safetensors")
    assert checkpoint_family(single) == "flux2"
    refusal = FAMILIES["flux2"].refusal(resolve_model(str(single)))
    assert "holds the transformer only: set base_model_config" in refusal
    loaded = load_base_model(resolve_model(str(single), str(flux2.source.path)), torch.device("cpu"))
    theirs, ours = flux2.denoiser.state_dict(), loaded.denoiser.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)


def edited_folder(flux2, folder: Path, **index) -> ModelSource:
    """A copy of the built-in folder whose model_index.json says `index` (components by class)."""
    shutil.copytree(flux2.source.path, folder)
    saved = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(saved | index))
    return ModelSource("folder", folder)


def test_flux2_klein_is_refused_for_its_qwen3_encoder(flux2, tmp_path):
    klein = edited_folder(
        flux2,
        tmp_path / "klein",
        _class_name="Flux2KleinPipeline",
        text_encoder=["transformers", "Qwen3ForCausalLM"],
    )
    assert detect_family(klein) == "flux2"
    with pytest.raises(ModelNotFoundError, match=r"Flux2KleinPipeline .*Qwen3ForCausalLM.*trains FLUX.2-dev LoRAs"):
        load_base_model(klein, torch.device("cpu"))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_a_pixtral_processor_without_torchvision_is_refused_with_what_to_install(flux2, tmp_path):
    """The released FLUX.2-dev's tokenizer folder is a PixtralProcessor (as its model_index.json names it)."""
    released = edited_folder(flux2, tmp_path / "released", tokenizer=["transformers", "PixtralProcessor"])
    config = json.loads((released.path / "tokenizer" / "tokenizer_config.json").read_text())
    (released.path / "tokenizer" / "tokenizer_config.json").write_text(
        json.dumps(config | {"processor_class": "PixtralProcessor"})
    )
    with pytest.raises(ModelNotFoundError, match=r"PixtralProcessor.*torchvision.*pip install torchvision"):
        load_base_model(released, torch.device("cpu"))


# --- latents, captions and the forward pass ----------------------------------------------------------


def test_latents_and_captions_are_flux2pipelines(flux2):
    """Latents: 2x2 patches normalised by the VAE's batch-norm statistics, as the pipeline encodes images, and
    decoded as it decodes its own; captions: Mistral's layers 10, 20, 30 side by side, 512 tokens, no mask."""
    pipe, family = flux2.pipeline, flux2.family_rules
    prompts = [PROMPT, "a blue square on a white background, flat colours"]
    text = encode_text(flux2, prompts, max_token_length=75, clip_skip=1)
    states, _ = pipe.encode_prompt(prompts, device="cpu")
    assert text.states.shape == (2, 512, 48) and text.pooled is None and text.mask is None
    assert torch.equal(text.states, states)

    pixels = torch.rand(2, 3, 64, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ours = family.encode_latents(flux2.vae, pixels, None)
        assert ours.shape == (2, 64, 4, 2) and torch.allclose(ours, pipe._encode_vae_image(pixels, None), atol=1e-6)
        options = dict(prompt_embeds=states[:1], num_inference_steps=2, height=64, width=32, guidance_scale=4.0)
        packed = pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **options).images
        decoded = family.decode_latents(flux2.vae, family.sample_latents(flux2, packed, 64, 32))
        theirs = pipe(generator=torch.Generator().manual_seed(0), output_type="pt", **options).images
    assert torch.allclose((decoded / 2 + 0.5).clamp(0, 1), theirs, atol=1e-5)


def test_the_training_forward_pass_is_the_pipelines_denoising_step(flux2):
    """One Euler step of Flux2Pipeline at guidance 1 (the training guidance) from noise at its first sigma lands at
    noisy - sigma * velocity, with the velocity our training forward pass predicts for two captions: the packing,
    the position ids, the timestep and the guidance input agree."""
    pipe, flow = flux2.pipeline, objective(flux2)
    text = encode_text(flux2, [PROMPT, "a blue square"], max_token_length=75, clip_skip=1)
    noisy = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stepped = pipe(
            prompt_embeds=text.states,
            latents=noisy,
            sigmas=[0.6],  # shifted by the scheduler by the image's 16 tokens: 0.915
            num_inference_steps=1,
            guidance_scale=1.0,
            height=64,
            width=64,
            output_type="latent",
        ).images
        sigma = pipe.scheduler.sigmas[0]
        velocity = flow.predict(noisy, sigma.expand(2), checks.text_batch(text.states), torch.float32)
    assert 0.9 < float(sigma) < 0.93 and flow.image_tokens(noisy) == 16
    stepped = flux2.family_rules.sample_latents(flux2, stepped, 64, 64)  # tokens back to a grid
    assert torch.allclose(stepped, noisy - sigma * velocity, atol=1e-5)


# --- training, the file, and diffusers ------------------------------------------------------------------


def test_training_lowers_the_loss_on_the_training_images(trained):
    """The objective's loss on the training images and their captions (encoded once: no LoRA adapts Mistral)."""
    model = load_base_model(resolve_model(MODEL), torch.device("cpu"))
    pixels, captions = checks.training_images(trained.parent / "data")
    with torch.no_grad():
        x0 = model.family_rules.encode_latents(model.vae, pixels, None)
        text = checks.text_batch(encode_text(model, captions, max_token_length=75, clip_skip=1).states)
    base = checks.flow_loss(objective(model), x0, text)
    model.pipeline.load_lora_weights(str(trained / "a.safetensors"), adapter_name="a")
    assert checks.flow_loss(objective(model), x0, text) < 0.97 * base


def test_the_lora_file_names_real_layers_with_alpha_folded_in_as_comfyui_maps_them(trained, flux2):
    lora = trained / "a.safetensors"
    tensors, metadata = checks.read_tensors(lora)
    assert metadata["ss_base_model_version"] == "flux2" and metadata["modelspec.architecture"] == "flux-2-dev/lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (str(RANK), str(ALPHA))
    assert "lora_adapter_metadata" not in metadata
    assert json.loads(metadata["training_config"])["output_format"] == "diffusers"

    prefix = COMFYUI_FLUX2["prefix"]
    assert all(key.startswith(prefix) and key.endswith((".lora_A.weight", ".lora_B.weight")) for key in tensors)
    modules = {key.removeprefix(prefix).rsplit(".", 2)[0] for key in tensors}
    assert modules <= checks.linear_layers(flux2.denoiser) and len(tensors) == 2 * len(modules)
    assert len(modules) == 8 + 1  # the double block's 8 attention projections, the single block's fused input
    for module in modules:
        blocks, _, suffix = module.split(".", 2)
        assert suffix in COMFYUI_FLUX2[blocks], module
    weights = read_lora_file(lora, {"transformer": flux2.denoiser})  # folded: read back at alpha = rank
    assert {w.alpha for w in weights.values()} == {float(RANK)} and len(weights) == len(modules)


def test_flux2pipeline_loads_the_lora_and_strength_0_is_the_base_exactly(trained, flux2):
    pipe = checks.diffusers_pipeline(flux2)
    base = latents(pipe)
    pipe.load_lora_weights(str(trained / "a.safetensors"), adapter_name="trained")
    assert pipe.transformer.transformer_blocks[0].attn.to_q.scaling["trained"] == 1.0  # alpha / rank is in lora_B
    checks.assert_changes_and_strength_0_is_base(pipe, latents, base, "trained")


def test_a_run_samples_and_records_its_losses(trained):
    checks.assert_run_records(trained, steps=5)


# --- merge, convert, generate ---------------------------------------------------------------------------


def test_two_flux2_loras_merged_equal_them_stacked(trained, flux2, tmp_path):
    a = trained / "a.safetensors"
    b = checks.with_other_up_weights(a, tmp_path / "b.safetensors", scale=0.5)
    merged = checks.assert_merged_equals_stacked(checks.diffusers_pipeline(flux2), latents, a, b, tmp_path, acts=1e-4)
    assert all(key.startswith("transformer.") and not key.endswith(".alpha") for key in checks.read_tensors(merged)[0])


def test_flux2_loras_convert_losslessly_and_never_to_kohyas_layout(trained, tmp_path):
    checks.assert_converts_losslessly_and_never_to_kohya(trained / "a.safetensors", tmp_path, "kohya's FLUX.2 layout")


def test_generate_image_renders_flux2_with_a_lora_at_its_strength(trained, tmp_path):
    checks.assert_renders_at_its_strengths(MODEL, trained / "a.safetensors", tmp_path)  # at FLUX.2's guidance 4


# --- what the guide and the plans say ------------------------------------------------------------------


def test_options_that_do_not_fit_flux2_are_refused_or_warned():
    errors, _ = checks.conflicts("flux2", train_text_encoder=True, min_snr_gamma=5.0, output_format="kohya")
    assert len(errors) == 3 and "FLUX.2 LoRAs train the transformer only" in errors[0]
    assert "kohya's FLUX.2 layout" in errors[2]
    _, warnings = checks.conflicts("flux2", clip_skip=2, max_token_length=150)
    assert "come from Mistral" in warnings[0] and "Mistral (up to 512 tokens)" in warnings[1]


def test_the_plan_for_flux2_fits_48_gb_not_24_and_the_readme_config_fits():
    recommended = checks.plan("black-forest-labs/FLUX.2-dev", 1024, detected_family="flux2")
    config = recommended.config
    assert (config["optimizer"], config["mixed_precision"], config["quantize_base"]) == ("adafactor", "bf16", "8bit")
    assert (config["low_vram"], config["gradient_checkpointing"]) == (True, True)
    reason = recommended.reasons["quantize_base"]
    assert "32 B transformer" in reason and "no setting fits 24 GB" in reason
    validated = TrainingConfig.from_dict(config)
    assert validated.family_conflicts("flux2") == ([], [])
    assert 24 < estimate_vram_gb(validated, 1024, "flux2") < 48  # the estimate the plan is made to fit
    assert FAMILIES["flux2"].hardware.minimum_gb == 48 and not FAMILIES["flux2"].hardware.from_guide
    by_name = checks.plan("black-forest-labs/FLUX.2-dev", None)  # files not downloaded: FLUX.2 by its name
    assert by_name.config == config and "FLUX.2" in by_name.reasons["model_name"]
    readme = checks.example("flux2.yaml")
    assert readme.family_conflicts("flux2") == ([], [])
    resolved = readme.resolve(native_resolution=1024, num_images=20, family="flux2")
    assert resolved.output_format == "diffusers" and resolved.sample_guidance_scale == 4.0
    assert estimate_vram_gb(resolved, 1024, "flux2") < 48
