"""Chroma on the built-in tiny ChromaPipeline: recognised from its files, T5 states with Chroma's mask as
diffusers computes them, a training forward pass that is the pipeline's own denoising step, a LoRA that
lowers the loss on its training images, written in FLUX's diffusers layout with alphas (which ComfyUI maps
and ChromaPipeline loads: strength 0 is the base exactly), and that merges, converts and renders through
generate-image."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import family_checks as checks
import pytest
import torch
from family_checks import ALPHA, PROMPT, RANK
from safetensors.torch import save_file

from training.config import TrainingConfig
from training.families import FAMILIES, checkpoint_family, folder_family, lora_family
from training.families.chroma import CHROMA, ChromaObjective
from training.lora import read_lora_file
from training.models.source import ModelSource
from training.prompts import encode_text

MODEL = "builtin:tiny-chroma"

# What ComfyUI's LoRA loader maps for Chroma (comfy/model_base.py: Chroma subclasses Flux, so comfy/lora.py
# model_lora_keys_unet takes its Flux branch: `transformer.` + the diffusers names of comfy/utils.py
# flux_to_diffusers, Comfy-Org/ComfyUI; research §4.1): per block, the diffusers module suffixes it maps onto BFL's
# double_blocks.N / single_blocks.N.
COMFYUI_CHROMA = {
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
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "norm1.linear",
        "norm1_context.linear",
    },
    "single_transformer_blocks": {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"},
}


chroma = checks.base_model(MODEL)


trained = checks.trained_lora(MODEL, images=4, **checks.sampling(every=6))


@pytest.fixture(scope="module")
def dataset(trained) -> Path:
    return trained.parent.parent / "data"


latents = functools.partial(checks.latents, guidance_scale=2.0)


# --- recognising it -----------------------------------------------------------------------------------


def test_the_built_in_folder_and_a_single_file_are_recognised_as_chroma(chroma, tmp_path):
    folder = chroma.source.path
    checks.assert_built_in_recognised(chroma, "chroma")
    assert folder_family(folder) is CHROMA and lora_family(chroma.lora_models) is CHROMA
    # A single file in lodestones' layout: diffusers tells it from FLUX by the modulation approximator.
    single = tmp_path / "chroma-unlocked.safetensors"
    save_file(
        {
            "distilled_guidance_layer.in_proj.bias": torch.zeros(2),
            "double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2),
        },
        str(single),
    )
    assert checkpoint_family(single) == "chroma"
    refusal = CHROMA.refusal(ModelSource("single_file", single))
    assert "holds the transformer only: set base_model_config" in refusal
    assert CHROMA.refusal(ModelSource("single_file", single, folder)) is None
    assert FAMILIES["flux"].recognises_checkpoint("chroma") is False


# --- conditioning and the objective ---------------------------------------------------------------


def test_prompts_are_t5_states_with_chromas_mask(chroma):
    prompts = [PROMPT, "a blue square on a white background, flat colours"]
    ours = encode_text(chroma, prompts, max_token_length=75, clip_skip=1)
    states, _, mask, *_ = chroma.pipeline.encode_prompt(
        prompts, device=torch.device("cpu"), do_classifier_free_guidance=False, max_sequence_length=512
    )
    assert torch.equal(ours.states, states) and ours.pooled is None
    assert ours.states.shape == (2, 512, 32) and ours.mask.dtype == torch.bool
    # The caption's T5 tokens (with </s>) and the first pad token are attended, the rest is masked.
    lengths = [len(chroma.pipeline.tokenizer(p).input_ids) for p in prompts]
    assert ours.mask.sum(dim=1).tolist() == [n + 1 for n in lengths] and torch.equal(ours.mask, mask.bool())


def test_the_training_forward_pass_is_the_pipelines_denoising_step(chroma):
    """One Euler step of the family's ChromaPipeline from pure noise (sigma 1 -> 0) lands at noise - velocity, with
    the velocity our training forward pass predicts, whether the pipeline is given the prompt (generate-image) or
    its encoding (samples): packing, position ids, timestep and the extended mask agree. What the mask hides (T5's
    padding) changes nothing; diffusers' own float mask would have let it in."""
    from diffusers import ChromaPipeline

    pipe = chroma.pipeline
    sampler = checks.pipeline_objective(ChromaObjective, pipe)
    text = encode_text(chroma, [PROMPT], max_token_length=75, clip_skip=1)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    step = dict(latents=pipe._pack_latents(noise, 1, 16, 8, 8), sigmas=[1.0], num_inference_steps=1)
    step |= dict(height=64, width=64)
    step |= dict(guidance_scale=1.0, output_type="latent")  # no negative pass

    def stepped(**prompt) -> torch.Tensor:
        return pipe._unpack_latents(pipe(**prompt, **step).images, 64, 64, 8)

    with torch.no_grad():
        velocity = sampler.predict(noise, torch.ones(1), checks.text_batch(text.states, text.mask), torch.float32)
        hidden = text.states.clone()
        hidden[~text.mask] = 5.0
        masked = sampler.predict(noise, torch.ones(1), checks.text_batch(hidden, text.mask.long()), torch.float32)
        by_prompt = stepped(prompt=PROMPT)
        by_states = stepped(prompt_embeds=text.states, prompt_attention_mask=text.mask)
        float_mask = stepped(prompt_embeds=text.states, prompt_attention_mask=text.mask.float())
    assert isinstance(pipe, ChromaPipeline) and torch.isfinite(velocity).all()
    assert torch.allclose(by_prompt, noise - velocity, atol=1e-5) and torch.equal(by_states, by_prompt)
    assert torch.allclose(masked, velocity, atol=1e-6)
    assert (float_mask - by_prompt).abs().max() > 1e-3


# --- training, the file, and diffusers ------------------------------------------------------------


def training_loss(pipe, dataset: Path) -> float:
    """The loss of `pipe`'s transformer on the training images and captions, encoded by the pipeline."""
    pixels, captions = checks.training_images(dataset)
    with torch.no_grad():
        x0 = CHROMA.encode_latents(pipe.vae, pixels, None)
        states, _, mask, *_ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    objective = checks.pipeline_objective(ChromaObjective, pipe)
    return checks.flow_loss(objective, x0, checks.text_batch(states, mask.bool()))


def test_tiny_chroma_trains_a_lora_that_lowers_its_loss_and_diffusers_loads(trained, chroma, dataset):
    tensors, metadata = checks.read_tensors(trained)
    assert metadata["ss_base_model_version"] == "chroma" and metadata["modelspec.architecture"] == "chroma/lora"
    assert json.loads(metadata["training_config"])["output_format"] == "diffusers"

    linear = checks.linear_layers(chroma.denoiser)
    modules = {key.removeprefix("transformer.").removesuffix(".alpha") for key in tensors if key.endswith(".alpha")}
    assert sorted(tensors) == sorted(
        f"transformer.{m}.{part}" for m in modules for part in ("lora_A.weight", "lora_B.weight", "alpha")
    )
    assert modules <= linear and "proj_out" not in modules  # real layers; the final projection stays as it is
    assert len(modules) == 17  # FLUX's 12 per double block, 5 per single block
    assert all(float(value) == ALPHA for key, value in tensors.items() if key.endswith(".alpha"))
    for module in modules:  # every one is a name ComfyUI maps
        blocks, _, suffix = module.split(".", 2)
        assert suffix in COMFYUI_CHROMA[blocks], module
    weights = read_lora_file(trained, chroma.lora_models)
    assert {w.alpha for w in weights.values()} == {ALPHA} and len(weights) == len(modules)

    pipe = checks.diffusers_pipeline(chroma)
    base, base_loss = latents(pipe), training_loss(pipe, dataset)
    pipe.load_lora_weights(str(trained), adapter_name="trained")
    assert pipe.transformer.transformer_blocks[0].attn.to_q.scaling["trained"] == ALPHA / RANK
    checks.assert_changes_and_strength_0_is_base(pipe, latents, base, "trained")
    trained_loss = training_loss(pipe, dataset)
    assert trained_loss < 0.98 * base_loss, (trained_loss, base_loss)


def test_options_that_do_not_fit_chroma_are_refused_or_warned():
    options = dict(train_text_encoder=True, min_snr_gamma=5.0, clip_skip=2, output_format="kohya")
    errors, warnings = checks.conflicts("chroma", **options)
    assert len(errors) == 3 and "Chroma LoRAs train the transformer only" in errors[0]
    assert "kohya's Chroma layout" in errors[2] and "no CLIP encoder" in warnings[0]


# --- merge, convert, generate ---------------------------------------------------------------------


def test_two_chroma_loras_merged_equal_them_stacked(trained, chroma, tmp_path):
    b = checks.with_other_up_weights(trained, tmp_path / "b.safetensors", scale=0.05)
    merged = checks.assert_merged_equals_stacked(checks.diffusers_pipeline(chroma), latents, trained, b, tmp_path)
    keys = list(checks.read_tensors(merged)[0])
    assert all(key.startswith("transformer.") for key in keys) and any(k.endswith(".alpha") for k in keys)


def test_chroma_loras_convert_losslessly_and_never_to_kohyas_layout(trained, tmp_path):
    checks.assert_converts_losslessly_and_never_to_kohya(trained, tmp_path, "kohya's Chroma layout")


def test_generate_image_and_compare_strengths_render_chroma_with_its_lora(trained, tmp_path):
    checks.assert_renders_at_its_strengths(MODEL, trained, tmp_path)


def test_a_run_samples_with_the_negative_prompt_and_its_control(trained):
    checks.assert_samples_with_control(trained.parent, step=6)


# --- plans and the README's example ---------------------------------------------------------------


def test_a_plan_for_chroma_uses_its_defaults():
    recommended = checks.plan("lodestones/Chroma1-HD", 1024, detected_family="chroma")
    config = recommended.config
    assert (config["optimizer"], config["mixed_precision"], config["quantize_base"]) == ("adafactor", "bf16", "8bit")
    assert "Chroma's 8.9 B transformer" in recommended.reasons["quantize_base"]
    assert TrainingConfig.from_dict(config).family_conflicts("chroma") == ([], [])
    # By its name alone (files not downloaded): Chroma, not the SDXL that 1024 px would say.
    by_name = checks.plan("lodestones/Chroma1-HD", None)
    assert by_name.config == config and "Chroma" in by_name.reasons["model_name"]


def test_the_readme_example_for_chroma_is_a_valid_config():
    config = checks.example("chroma.yaml")
    assert config.family_conflicts("chroma") == ([], [])
    assert config.resolve(native_resolution=1024, num_images=15, family="chroma").output_format == "diffusers"
