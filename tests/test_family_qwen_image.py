"""Qwen-Image on the built-in tiny QwenImagePipeline: recognised from its files and a transformer file's keys,
Qwen2.5-VL states of each caption's own length with a mask as diffusers computes them, latents normalised per
channel as the pipeline denormalises them, a training forward pass that is the pipeline's own denoising step,
a LoRA that lowers the loss on its training images, written with alpha folded into lora_B (which ComfyUI maps
and QwenImagePipeline loads: strength 0 is the base exactly), and that merges, converts and renders through
generate-image with true classifier-free guidance."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import family_checks as checks
import numpy as np
import pytest
import torch
from family_checks import ALPHA, PROMPT, RANK
from safetensors.torch import save_file

from training.config import TrainingConfig
from training.estimates import estimate_vram_gb
from training.families import FAMILIES, checkpoint_family, detect_family, folder_family, lora_family
from training.families.qwen_image import QWEN_IMAGE, QwenImageObjective
from training.lora import read_lora_file
from training.models.source import ModelSource
from training.prompts import encode_text

MODEL = "builtin:tiny-qwen-image"

# What ComfyUI's LoRA loader maps for Qwen-Image (Comfy-Org/ComfyUI comfy/lora.py model_lora_keys_unet, its
# model_base.QwenImage branch: ComfyUI's Qwen-Image modules have diffusers' names, so it accepts `transformer.` +
# the module path of every Linear layer of the diffusion model; research §4.1). Per block, the suffixes it maps.
COMFYUI_QWEN_IMAGE = {
    "prefix": "transformer.",
    "transformer_blocks": {
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
        "img_mod.1",
        "txt_mod.1",
    },
}


qwen = checks.base_model(MODEL)


trained = checks.trained_lora(MODEL, images=4, **checks.sampling(every=6))


@pytest.fixture(scope="module")
def dataset(trained) -> Path:
    return trained.parent.parent / "data"


latents = functools.partial(checks.latents, true_cfg_scale=2.0, negative_prompt=" ")


# --- recognising it -----------------------------------------------------------------------------------


def test_the_built_in_folder_and_a_transformer_file_are_recognised_as_qwen_image(qwen, tmp_path):
    folder = qwen.source.path
    checks.assert_built_in_recognised(qwen, "qwen_image")  # the built-in VAE's recorded size
    assert folder_family(folder) is QWEN_IMAGE and lora_family(qwen.lora_models) is QWEN_IMAGE
    assert QWEN_IMAGE.geometry({"temperal_downsample": [False, True, True]}, {}) == (1328, 16)  # the real VAE's
    # A transformer file (ComfyUI's layout: diffusers' names under its prefix): told by its keys, which diffusers
    # would read as SD 1.x; it needs base_model_config (QwenImagePipeline has no single-file loader).
    single = tmp_path / "qwen_image_bf16.safetensors"
    keys = ("txt_norm.weight", "transformer_blocks.0.img_mod.1.weight", "img_in.weight")
    save_file({f"model.diffusion_model.{key}": torch.zeros(2, 2) for key in keys}, str(single))
    assert checkpoint_family(single) == "qwen_image"
    assert "set base_model_config" in QWEN_IMAGE.refusal(ModelSource("single_file", single))
    assert "ComfyUI's `model.diffusion_model.` prefix" in QWEN_IMAGE.refusal(ModelSource("single_file", single, folder))
    bare = tmp_path / "qwen_image_bare.safetensors"  # the names diffusers' single-file loader reads
    save_file({key: torch.zeros(2, 2) for key in keys}, str(bare))
    assert checkpoint_family(bare) == "qwen_image"
    assert QWEN_IMAGE.refusal(ModelSource("single_file", bare, folder)) is None
    save_file({"txt_norm.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))  # one key is not enough
    assert checkpoint_family(tmp_path / "other.safetensors") != "qwen_image"
    # An Edit model has the same transformer class, but its transformer also attends to the input image.
    edit = tmp_path / "edit"
    edit.mkdir()
    index = json.loads((folder / "model_index.json").read_text())
    (edit / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImageEditPipeline"}))
    assert detect_family(ModelSource("folder", edit)) == "qwen_image"
    assert "QwenImageEditPipeline model, which edits" in QWEN_IMAGE.refusal(ModelSource("folder", edit))
    assert not any(family.named_by("qwen/qwen-image") for family in FAMILIES.values() if family is not QWEN_IMAGE)


# --- conditioning, latents and the objective -----------------------------------------------------------


def test_prompts_are_qwen_states_of_their_own_length_with_a_mask(qwen):
    prompts = [PROMPT, "a blue square on a white background, flat colours"]
    ours = encode_text(qwen, prompts, max_token_length=75, clip_skip=1)
    states, mask = qwen.pipeline.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=512)
    assert torch.equal(ours.states, states) and torch.equal(ours.mask, mask) and ours.pooled is None
    # one byte symbol per token: the longer caption's extra bytes are the shorter one's padding
    lengths = ours.mask.sum(dim=1)
    assert int(lengths[1] - lengths[0]) == len(prompts[1]) - len(prompts[0]) and ours.states.shape[1] == lengths[1]
    alone = encode_text(qwen, [PROMPT], max_token_length=75, clip_skip=1)
    assert alone.mask is None and alone.states.shape[1] == lengths[0]  # no padding, no mask


def test_latents_are_normalised_per_channel_as_the_pipeline_denormalises_them(qwen):
    """The pipeline's own rendering equals our decode of its latents, and our encode inverts our decode's
    normalisation (the VAE's per-channel latents_mean and latents_std, not FLUX's scale and shift)."""
    pipe = qwen.pipeline
    vae_config = qwen.vae.config
    assert len(set(vae_config.latents_std)) > 1 and qwen.vae_scale_factor == 8
    options = dict(num_inference_steps=2, height=64, width=64)
    with torch.no_grad():
        packed = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent", **options).images
        rendered = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt", **options).images
        unpacked = QWEN_IMAGE.sample_latents(qwen, packed, 64, 64)
        pixels = QWEN_IMAGE.decode_latents(qwen.vae, unpacked)
        assert unpacked.shape == (1, 16, 8, 8)
        assert torch.allclose((pixels / 2 + 0.5).clamp(0, 1), rendered, atol=1e-5)
        encoded = QWEN_IMAGE.encode_latents(qwen.vae, pixels, None)
        raw = qwen.vae.encode(pixels[:, :, None]).latent_dist.mean[:, :, 0]
        mean = torch.tensor(vae_config.latents_mean).view(1, 16, 1, 1)
        std = torch.tensor(vae_config.latents_std).view(1, 16, 1, 1)
        assert torch.allclose(encoded, (raw - mean) / std, atol=1e-6)


def test_the_training_forward_pass_is_the_pipelines_denoising_step(qwen):
    """Each Euler step of QwenImagePipeline moves its latents by (next sigma - sigma) x the velocity our training
    forward pass predicts at that sigma (1, then the scheduler's shifted, stretched second level): packing, image
    shapes and timestep agree; and a caption padded in a batch with a longer one gets the velocity it gets
    alone (the mask hides the padding)."""
    pipe = qwen.pipeline
    sampler = checks.pipeline_objective(QwenImageObjective, pipe)
    text = encode_text(qwen, [PROMPT], max_token_length=75, clip_skip=1)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    steps = [noise]

    def keep(pipe, step, timestep, tensors):
        steps.append(QWEN_IMAGE.sample_latents(qwen, tensors["latents"], 64, 64))
        return tensors

    with torch.no_grad():
        pipe(
            prompt_embeds=text.states,
            prompt_embeds_mask=text.mask,
            latents=pipe._pack_latents(noise, 1, 16, 8, 8),
            num_inference_steps=2,
            true_cfg_scale=1.0,  # no negative pass
            height=64,
            width=64,
            output_type="latent",
            callback_on_step_end=keep,
        )
        sigmas = pipe.scheduler.sigmas
        assert sigmas[0] == 1.0 and 0 < sigmas[1] < 1
        for step in range(2):
            level = sigmas[step].view(1)
            velocity = sampler.predict(steps[step], level, checks.text_batch(text.states, text.mask), torch.float32)
            moved = steps[step] + (sigmas[step + 1] - sigmas[step]) * velocity
            assert torch.allclose(moved, steps[step + 1], atol=1e-5), step
        both = encode_text(qwen, [PROMPT, PROMPT + " on a white background"], max_token_length=75, clip_skip=1)
        padded = both.states.clone()
        padded[both.mask == 0] = 5.0
        batch = checks.text_batch(padded, both.mask)
        batched = sampler.predict(noise.expand(2, -1, -1, -1), torch.ones(2), batch, torch.float32)
        alone = sampler.predict(noise, torch.ones(1), checks.text_batch(text.states, text.mask), torch.float32)
    assert torch.isfinite(alone).all() and torch.allclose(batched[0], alone[0], atol=1e-5)
    assert not torch.allclose(batched[1], alone[0], atol=1e-3)  # the longer caption's own


# --- training, the file, and diffusers ------------------------------------------------------------


def training_loss(pipe, dataset: Path) -> float:
    """The loss of `pipe`'s transformer on the training images and captions, encoded by the pipeline."""
    pixels, captions = checks.training_images(dataset)
    with torch.no_grad():
        x0 = QWEN_IMAGE.encode_latents(pipe.vae, pixels, None)
        states, mask = pipe.encode_prompt(captions, device="cpu", max_sequence_length=512)
    objective = checks.pipeline_objective(QwenImageObjective, pipe)
    return checks.flow_loss(objective, x0, checks.text_batch(states, mask))


def test_tiny_qwen_image_trains_a_lora_that_lowers_its_loss_and_diffusers_loads(trained, qwen, dataset):
    tensors, metadata = checks.read_tensors(trained)
    assert metadata["ss_base_model_version"] == "qwen_image" and metadata["modelspec.architecture"] == "qwen-image/lora"
    assert (float(metadata["ss_network_alpha"]), int(metadata["ss_network_dim"])) == (ALPHA, RANK)
    assert "lora_adapter_metadata" not in metadata  # alpha is in lora_B: diffusers and ComfyUI read scale 1
    assert json.loads(metadata["training_config"])["output_format"] == "diffusers"

    linear = checks.linear_layers(qwen.denoiser)
    modules = {key.removeprefix("transformer.").removesuffix(".lora_A.weight") for key in tensors if ".lora_A." in key}
    parts = ("lora_A.weight", "lora_B.weight")  # no `.alpha`: folded into lora_B
    assert sorted(tensors) == sorted(f"transformer.{m}.{part}" for m in modules for part in parts)
    assert modules <= linear and len(modules) == 2 * 8  # the 8 attention projections of each of the 2 blocks
    for module in modules:  # every one is a name ComfyUI maps
        blocks, _, suffix = module.split(".", 2)
        assert suffix in COMFYUI_QWEN_IMAGE[blocks], module
    weights = read_lora_file(trained, qwen.lora_models)
    assert {w.alpha for w in weights.values()} == {RANK} and len(weights) == len(modules)  # folded: alpha = rank

    pipe = checks.diffusers_pipeline(qwen)
    base, base_loss = latents(pipe), training_loss(pipe, dataset)
    pipe.load_lora_weights(str(trained), adapter_name="trained")
    assert pipe.transformer.transformer_blocks[0].attn.to_q.scaling["trained"] == 1.0
    checks.assert_changes_and_strength_0_is_base(pipe, latents, base, "trained")
    trained_loss = training_loss(pipe, dataset)
    assert trained_loss < 0.98 * base_loss, (trained_loss, base_loss)


def test_options_that_do_not_fit_qwen_image_are_refused_or_warned():
    options = dict(train_text_encoder=True, min_snr_gamma=5.0, clip_skip=2, output_format="kohya")
    errors, warnings = checks.conflicts("qwen_image", **options)
    assert len(errors) == 3 and "Qwen-Image LoRAs train the transformer only" in errors[0]
    assert "kohya's layout is not written for Qwen-Image" in errors[2] and "is not CLIP" in warnings[0]


# --- merge, convert, generate ---------------------------------------------------------------------


def test_two_qwen_image_loras_merged_equal_them_stacked(trained, qwen, tmp_path):
    b = checks.with_other_up_weights(trained, tmp_path / "b.safetensors", scale=0.05)
    merged = checks.assert_merged_equals_stacked(checks.diffusers_pipeline(qwen), latents, trained, b, tmp_path)
    assert all(key.startswith("transformer.") and ".lora_" in key for key in checks.read_tensors(merged)[0])


def test_qwen_image_loras_convert_losslessly_and_never_to_kohyas_layout(trained, tmp_path):
    refusal = "kohya's layout is not written for Qwen-Image"
    checks.assert_converts_losslessly_and_never_to_kohya(trained, tmp_path, refusal)


def test_generate_image_and_compare_strengths_render_qwen_image_with_its_lora(trained, tmp_path):
    base = checks.assert_renders_at_its_strengths(MODEL, trained, tmp_path)
    [guided] = checks.render(MODEL, tmp_path / "guided", guidance=1.0)  # true_cfg_scale 1: no negative pass
    assert not np.array_equal(guided, base)  # another image


def test_a_run_samples_with_the_negative_prompt_and_its_control(trained):
    checks.assert_samples_with_control(trained.parent, step=6)  # after the text encoder was released


def test_the_text_encoder_is_released_once_every_caption_and_prompt_is_encoded(dataset, tmp_path):
    """Qwen2.5-VL (16.6 GB at full size) leaves the run once the captions are cached: the sample, control and
    negative prompts are kept encoded, and samples render from them."""
    from conftest import fast_config

    from training.trainer import Trainer

    config = fast_config(dataset, name="released", model_name=MODEL, steps=1, test_prompts=[PROMPT])
    trainer = Trainer(config, tmp_path / "released")
    trainer.setup()
    try:
        assert trainer.base.pipeline.text_encoder is None
        assert {PROMPT, ""} <= set(trainer.base.encoded_prompts)
        trainer._optimizer_step()
        trainer._render_samples()
        samples = json.loads(trainer.files.status.read_text())["latest_samples"]
        assert len(samples) == 2 and all((trainer.files.samples / name).is_file() for name in samples)  # + control
        with pytest.raises(RuntimeError, match="released after caching"):
            encode_text(trainer.base, ["a prompt never encoded"], max_token_length=75, clip_skip=1)
    finally:
        trainer.cleanup(trainer.finish())


# --- plans and the README's example ---------------------------------------------------------------


def test_a_plan_for_qwen_image_uses_its_defaults():
    recommended = checks.plan("Qwen/Qwen-Image", 1328, detected_family="qwen_image")
    config = recommended.config
    assert (config["optimizer"], config["mixed_precision"], config["quantize_base"]) == ("adafactor", "bf16", "8bit")
    reason = recommended.reasons["quantize_base"]
    assert "20 B transformer" in reason and "estimate" in reason
    assert (config["low_vram"], config["gradient_checkpointing"], config["resolution"]) == (True, True, 768)
    validated = TrainingConfig.from_dict(config)
    assert validated.family_conflicts("qwen_image") == ([], [])
    # the estimate the plan is made to fit: 24 GB at 768 px, not at native size
    native = validated.model_copy(update={"resolution": 1328})
    assert estimate_vram_gb(validated, 1328, "qwen_image") < 24 < estimate_vram_gb(native, 1328, "qwen_image")
    # By its name alone (files not downloaded): Qwen-Image, whatever its size says.
    by_name = checks.plan("Qwen/Qwen-Image", None)
    assert by_name.config == config and "Qwen-Image" in by_name.reasons["model_name"]


def test_the_readme_example_for_qwen_image_is_a_valid_config():
    config = checks.example("qwen-image.yaml")
    assert config.family_conflicts("qwen_image") == ([], [])
    resolved = config.resolve(native_resolution=1328, num_images=15, family="qwen_image")
    assert resolved.output_format == "diffusers" and resolved.resolution == 768
    assert estimate_vram_gb(resolved, 1328, "qwen_image") < 24
