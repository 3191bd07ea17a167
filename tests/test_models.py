"""Finding and loading base models offline."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from training.models.builtin import ensure_builtin
from training.families import detect_family, read_geometry
from training.models.loading import load_base_model
from training.models.source import ModelNotFoundError, resolve_model


def test_builtins_load_like_any_diffusers_folder(tiny_sd15, tiny_sd2v):
    sd15 = load_base_model(resolve_model("builtin:tiny-sd15"), torch.device("cpu"))
    assert sd15.source.kind == "builtin" and sd15.source.path == tiny_sd15
    assert (sd15.family, sd15.prediction_type, sd15.native_resolution, sd15.bucket_step) == ("sd1", "epsilon", 64, 16)
    sd2 = load_base_model(resolve_model(str(tiny_sd2v)), torch.device("cpu"))
    assert sd2.source.kind == "folder"
    assert (sd2.family, sd2.prediction_type, sd2.base_model_version) == ("sd2", "v_prediction", "sd_v2_v")
    assert json.loads((tiny_sd15 / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_builtins_are_built_deterministically(tmp_path, tiny_sd15):
    rebuilt = ensure_builtin("builtin:tiny-sd15", tmp_path / "models")
    for part in (
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        original, again = load_file(tiny_sd15 / part), load_file(rebuilt / part)
        assert original.keys() == again.keys()
        assert all(torch.equal(original[k], again[k]) for k in original)
    assert ensure_builtin("builtin:tiny-sd15", tmp_path / "models") == rebuilt  # cached, not rebuilt
    assert [p.name for p in (tmp_path / "models").iterdir()] == [rebuilt.name]  # no staging left


def test_unknown_builtin_lists_the_builtins():
    with pytest.raises(ModelNotFoundError, match="builtin:tiny-sd15"):
        resolve_model("builtin:huge")


def test_a_model_not_found_offline_says_where_it_looked(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFoundError) as raised:
        resolve_model("someone/not-cached-model")
    message = str(raised.value)
    assert "someone/not-cached-model" in message
    assert "Hugging Face cache" in message and "builtin:tiny-sd15" in message
    assert "huggingface-cli download" in message and str(tmp_path / "empty-cache") in message


def test_missing_paths_and_non_pipelines_are_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nothing.safetensors"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        resolve_model(str(tmp_path / "plain"))


def test_the_family_is_read_from_the_models_own_files(tmp_path, tiny_sd15, tiny_sd2v, tiny_sdxl):
    assert detect_family(resolve_model("builtin:tiny-sd15")) == "sd1"
    assert detect_family(resolve_model(str(tiny_sd2v))) == "sd2"
    renamed = tmp_path / "my-sd15-model"  # the name says nothing; the files do
    shutil.copytree(tiny_sdxl, renamed)
    assert detect_family(resolve_model(str(renamed))) == "sdxl"
    flux = tmp_path / "flex"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": ["x", "y"]}))
    assert detect_family(resolve_model(str(flux))) == "flux"
    pixart = tmp_path / "pixart"
    pixart.mkdir()
    index = {"_class_name": "PixArtSigmaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}
    (pixart / "model_index.json").write_text(json.dumps(index))
    assert detect_family(resolve_model(str(pixart))) is None  # a transformer pipeline of no family known here
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    assert detect_family(resolve_model(str(checkpoint))) is None  # a single file alone does not say
    assert detect_family(resolve_model(str(checkpoint), str(tiny_sd2v))) == "sd2"


@pytest.mark.parametrize(
    ("key", "shape", "family"),
    [
        ("model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", (2, 768), "sd1"),
        ("model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", (2, 1024), "sd2"),
        ("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias", (4,), "sdxl"),
        ("double_blocks.0.img_attn.norm.key_norm.scale", (4,), "flux"),
    ],
)
def test_a_single_file_checkpoint_is_judged_by_its_tensor_names(tmp_path, key, shape, family):
    """The signature tensors of each family's original checkpoint layout (as diffusers' single-file
    loader tells them apart); only the header is read."""
    from safetensors.torch import save_file

    checkpoint = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(shape)}, str(checkpoint))
    assert detect_family(resolve_model(str(checkpoint))) == family


def test_the_tiny_sdxl_model_is_a_real_sdxl_pipeline(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.text_encoder_2.config.projection_dim == 32


def test_the_tiny_flux_model_is_a_real_flux_pipeline(tmp_path):
    from diffusers import FluxPipeline

    folder = ensure_builtin("builtin:tiny-flux", tmp_path / "models")
    assert detect_family(resolve_model(str(folder))) == "flux"
    pipe = FluxPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    image = pipe(
        "a red circle", num_inference_steps=2, height=64, width=64, max_sequence_length=64, generator=generator
    ).images[0]
    assert image.size == (64, 64)
    assert pipe.tokenizer_2("a red circle").input_ids[-1] == pipe.tokenizer_2.eos_token_id  # T5-style, offline
    base = load_base_model(resolve_model(str(folder)), torch.device("cpu"))
    # The native size comes from the VAE's config (a transformer has none); sides step by 8 x 2 (2x2 patches).
    assert (base.family, base.native_resolution, base.bucket_step) == ("flux", 64, 16)
    assert read_geometry(folder) == (64, 16)  # the same, from the config files alone (dataset checks, validation)
    assert (base.prediction_type, base.base_model_version, base.guidance_embedded) == ("flow_matching", "flux1", True)
    assert list(base.lora_models) == ["transformer"] and base.denoiser is base.pipeline.transformer


def test_a_family_override_that_contradicts_the_files_is_refused(tiny_sd15, tiny_sdxl):
    sdxl = load_base_model(resolve_model("builtin:tiny-sdxl"), torch.device("cpu"), model_family="sdxl")
    assert (sdxl.family, sdxl.base_model_version, sdxl.native_resolution) == ("sdxl", "sdxl_base_v1-0", 64)
    assert sdxl.text_encoder_2 is not None and sdxl.tokenizer_2 is not None
    with pytest.raises(
        ModelNotFoundError, match="model_family is flux, but the files .* say it is a Stable Diffusion 1"
    ):
        load_base_model(resolve_model(str(tiny_sd15)), torch.device("cpu"), model_family="flux")
    with pytest.raises(ModelNotFoundError, match="not one of auto"):
        load_base_model(resolve_model(str(tiny_sd15)), torch.device("cpu"), model_family="pixart")


def test_a_hugging_face_id_resolves_from_the_local_cache(monkeypatch, tmp_path, tiny_sd15):
    """A repo already in the HF cache (here: the tiny model laid out as the hub lays out a download)."""
    import shutil

    import huggingface_hub.constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(tiny_sd15, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    source = resolve_model("someone/tiny-sd")
    assert source.kind == "hub" and source.path == repo / "snapshots" / revision
    base = load_base_model(source, torch.device("cpu"))
    assert base.native_resolution == 64


def test_a_flux_fill_or_control_model_is_refused_with_the_reason(tmp_path, workspace):
    """Their transformers take image or control latents beside the noisy ones (here 128 input channels,
    as FLUX.1 Canny/Depth): the text-to-image objective cannot feed them."""
    from diffusers import FluxTransformer2DModel

    folder = tmp_path / "flux-control"
    shutil.copytree(ensure_builtin("builtin:tiny-flux", workspace / "models"), folder)
    config = dict(FluxTransformer2DModel.load_config(str(folder / "transformer")))
    config.update(in_channels=128, out_channels=64)
    shutil.rmtree(folder / "transformer")
    FluxTransformer2DModel.from_config(config).save_pretrained(folder / "transformer")
    with pytest.raises(ModelNotFoundError, match="takes 128 input channels, not the 64 of text-to-image FLUX"):
        load_base_model(resolve_model(str(folder)), torch.device("cpu"))


def test_a_flux_single_file_needs_the_folder_of_its_model(tmp_path):
    """BFL's FLUX checkpoints hold the transformer only: the VAE and text encoders must come from somewhere."""
    from safetensors.torch import save_file

    checkpoint = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(4)}, str(checkpoint))
    with pytest.raises(ModelNotFoundError, match="holds the transformer only: set base_model_config"):
        load_base_model(resolve_model(str(checkpoint)), torch.device("cpu"))


def test_an_edm_trained_sdxl_model_is_refused_with_the_reason(tmp_path, tiny_sdxl):
    """Playground v2.5 has SDXL's architecture but EDM noise and normalised latents (latents_mean/std)."""
    folder = tmp_path / "playground"
    shutil.copytree(tiny_sdxl, folder)
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    vae_config.update(latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    (folder / "vae" / "config.json").write_text(json.dumps(vae_config))
    with pytest.raises(ModelNotFoundError, match="EDM noise and normalised latents"):
        load_base_model(resolve_model(str(folder)), torch.device("cpu"))
