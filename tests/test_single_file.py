"""Single-file checkpoints in the original Stable Diffusion (LDM / CompVis) key layout, the layout
of the .safetensors files people download from Civitai, load offline through resolve_model +
load_base_model when base_model_config names a diffusers folder of the same architecture, and
give the same UNet, VAE and text-encoder outputs as that folder's model; bad files fail with
ModelNotFoundError."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ldm_checkpoint import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, _config, _weights, diffusers_to_ldm
from safetensors.torch import save_file

from training.models.loading import load_base_model
from training.models.source import ModelNotFoundError, resolve_model

CPU = torch.device("cpu")
BUILTINS = {"tiny_sd15": "builtin:tiny-sd15", "tiny_sd2v": "builtin:tiny-sd2-v"}


def test_ldm_layout_round_trips_through_diffusers_converters(tiny_sd15):
    """Pins our inverse to diffusers' own forward mapping: diffusers' convert_ldm_* functions
    applied to our LDM dict give back exactly the diffusers keys and tensors."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )

    checkpoint = diffusers_to_ldm(tiny_sd15)

    # The layout really is the original one (the keys a Civitai SD 1.x file has) ...
    for key in (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "model.diffusion_model.time_embed.0.weight",
        "first_stage_model.encoder.down.0.block.0.norm1.weight",
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    ):
        assert key in checkpoint, key
    assert all(k.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)) for k in checkpoint)
    assert checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)  # 1x1 conv in LDM
    # ... and diffusers' detection (used only when no config is given) calls it SD 1.x.
    assert infer_diffusers_model_type(checkpoint) == "v1"

    back = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, _config(tiny_sd15 / "unet")),
        "vae": convert_ldm_vae_checkpoint(checkpoint, _config(tiny_sd15 / "vae")),
        # transformers >= 5.6 saves CLIPTextModel without the text_model. level; diffusers strips
        # it the same way before loading (create_diffusers_clip_model_from_ldm).
        "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()},
    }
    for component, converted in back.items():
        original = _weights(tiny_sd15 / component)
        assert set(converted) == set(original), component
        for key, tensor in original.items():
            assert torch.equal(converted[key], tensor), f"{component}: {key}"
    assert len(checkpoint) == sum(len(_weights(tiny_sd15 / c)) for c in back)


@pytest.mark.parametrize("fixture", ["tiny_sd15", "tiny_sd2v"])
def test_ldm_single_file_loads_like_the_diffusers_folder(fixture, request, tmp_path):
    folder: Path = request.getfixturevalue(fixture)
    builtin = BUILTINS[fixture]
    path = tmp_path / f"{builtin.removeprefix('builtin:')}.safetensors"
    save_file(diffusers_to_ldm(folder), str(path))

    source = resolve_model(str(path), builtin)
    assert source.kind == "single_file"
    assert source.config_folder == folder.resolve()
    base = load_base_model(source, CPU)
    reference = load_base_model(resolve_model(builtin), CPU)
    assert reference.source.path == folder.resolve()

    assert base.native_resolution == 64
    if fixture == "tiny_sd15":
        assert (base.family, base.prediction_type) == ("sd1", "epsilon")
    else:
        assert (base.family, base.prediction_type) == ("sd2", "v_prediction")
    assert type(base.pipeline.scheduler) is type(reference.pipeline.scheduler)
    assert base.vae.config.scaling_factor == reference.vae.config.scaling_factor

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    states = torch.randn(1, 77, 32, generator=generator)
    image = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    ids, reference_ids = (
        model.tokenizer(
            "a photo of xyz_shape", padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        for model in (base, reference)
    )
    assert torch.equal(ids, reference_ids)

    with torch.no_grad():
        outputs = [
            (
                model.denoiser(latents, 500, encoder_hidden_states=states).sample,
                model.vae.encode(image).latent_dist.mean,
                model.vae.decode(latents).sample,
                model.text_encoder(ids).last_hidden_state,
            )
            for model in (base, reference)
        ]
    for name, got, want in zip(("unet", "vae encode", "vae decode", "text_encoder"), *outputs):
        assert got.shape == want.shape, name
        assert torch.allclose(got, want, rtol=0, atol=1e-6), f"{name}: max diff {(got - want).abs().max()}"

    # Stronger than the outputs: every weight arrived, in its place, with nothing left on the meta device.
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(base.pipeline, name).state_dict(), getattr(reference.pipeline, name).state_dict()
        assert set(got) == set(want), name
        for key, tensor in want.items():
            assert not got[key].is_meta and torch.equal(got[key], tensor), f"{name}: {key}"


def test_single_file_without_base_model_config_fails_offline(tiny_sd15, tmp_path, monkeypatch):
    """Without a config, diffusers guesses the architecture (here SD 1.5) and fetches that repo's
    configs; offline and with an empty HF cache that fails, and we say to set base_model_config."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    path = tmp_path / "tiny-sd15.safetensors"
    save_file(diffusers_to_ldm(tiny_sd15), str(path))

    source = resolve_model(str(path))
    assert source.kind == "single_file" and source.config_folder is None
    with pytest.raises(ModelNotFoundError, match="base_model_config") as caught:
        load_base_model(source, CPU)
    assert str(path) in str(caught.value)


def test_garbage_safetensors_file_is_model_not_found(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"this is not a safetensors file, just some bytes\x00\x01\x02")
    source = resolve_model(str(path), "builtin:tiny-sd15")
    with pytest.raises(ModelNotFoundError, match="could not load the model"):
        load_base_model(source, CPU)


def test_other_suffix_is_model_not_found(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelNotFoundError, match=r"\.safetensors"):
        resolve_model(str(path), "builtin:tiny-sd15")
