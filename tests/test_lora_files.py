"""LoRA files: kohya keys name real modules and load in diffusers; the diffusers format gives
the same model; resume_from continues a LoRA, also into a larger rank."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
import torch
from conftest import fast_config, tiny_pipeline
from safetensors import safe_open
from safetensors.torch import save_file

from training.lora import read_lora_file
from training.resume_source import ResumeSourceError, find_resume_lora
from training.trainer import Trainer, run_training


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd15):
    """One run that trains UNet and text encoder (rank 4, alpha 2), exported in both formats."""
    from training.data.synthetic import make_shape_dataset

    root = tmp_path_factory.mktemp("trained")
    make_shape_dataset(root / "data", 4, trigger_word="xyz_shape")
    config = fast_config(root / "data", steps=8, rank=4, alpha=2, train_text_encoder=True, learning_rate=5e-3)
    trainer = Trainer(config, root / "run")
    trainer.setup()
    trainer.train()
    kohya = trainer.cleanup(trainer.finish()).lora_path
    trainer.config = trainer.config.model_copy(update={"output_format": "diffusers"})
    diffusers_file = trainer._export(root / "diffusers-format.safetensors")
    return {"kohya": kohya, "diffusers": diffusers_file, "model": tiny_sd15, "root": root, "trainer": trainer}


def latents_of(pipe):
    generator = torch.Generator().manual_seed(3)
    return pipe(
        "xyz_shape a blue square", num_inference_steps=3, height=64, width=64, generator=generator, output_type="latent"
    ).images


def test_kohya_keys_name_real_modules_and_carry_alpha(trained):
    pipe = tiny_pipeline(trained["model"])
    unet_modules = {"lora_unet_" + name.replace(".", "_") for name, _ in pipe.unet.named_modules()}
    te_modules = {
        "lora_te_" + ("text_model." + name if not name.startswith("text_model.") else name).replace(".", "_")
        for name, _ in pipe.text_encoder.named_modules()
    }
    with safe_open(str(trained["kohya"]), "pt") as f:
        keys = list(f.keys())
        stems = {key.split(".")[0] for key in keys}
        alphas = {stem: f.get_tensor(f"{stem}.alpha").item() for stem in stems}
        shapes = {key: f.get_tensor(key).shape for key in keys}
    assert stems, "no LoRA keys"
    assert any(s.startswith("lora_te_text_model_encoder_layers_") for s in stems)
    assert any(s.startswith("lora_unet_") for s in stems)
    for stem in stems:
        assert stem in unet_modules | te_modules, f"{stem} names no module"
        assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= set(keys)
        assert alphas[stem] == 2.0
        assert shapes[f"{stem}.lora_down.weight"][0] == 4


def test_metadata_records_rank_alpha_trigger_and_config(trained):
    with safe_open(str(trained["kohya"]), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["modelspec.trigger_phrase"] == "xyz_shape"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_resolution"] == "(64, 64)"
    assert meta["ss_max_train_steps"] == "8" and meta["ss_steps"] == "8"
    assert meta["ss_num_epochs"] == "4" and meta["ss_epoch"] == "4"  # 8 steps of 2 batches per epoch
    tags = json.loads(meta["ss_tag_frequency"])
    assert sum(tags["."].values()) > 0
    config = json.loads(meta["training_config"])
    assert config["rank"] == 4 and config["trigger_word"] == "xyz_shape" and config["train_text_encoder"] is True

    with safe_open(str(trained["diffusers"]), "pt") as f:
        diffusers_meta = f.metadata()
    assert diffusers_meta["ss_network_dim"] == "4" and diffusers_meta["modelspec.trigger_phrase"] == "xyz_shape"
    adapter = json.loads(diffusers_meta["lora_adapter_metadata"])
    assert adapter["unet.r"] == 4 and adapter["unet.lora_alpha"] == 2 and adapter["text_encoder.lora_alpha"] == 2


def export_with(trained, name: str, **update) -> Path:
    trainer = trained["trainer"]
    kept = trainer.config
    trainer.config = kept.model_copy(update=update)
    try:
        return trainer._export(trained["root"] / name)
    finally:
        trainer.config = kept


def test_metadata_names_no_local_path_and_writes_the_model_spec_as_kohya_does(trained, tmp_path_factory):
    # The diffusers layout: its adapter config (peft's) names the base model's folder too.
    from_folder = export_with(
        trained, "folder.safetensors", model_name=str(trained["model"]), output_format="diffusers"
    )
    with safe_open(str(from_folder), "pt") as f:
        meta = f.metadata()
    local = (str(tmp_path_factory.getbasetemp()), str(Path.home()), str(trained["root"]))
    assert [(key, value) for key, value in meta.items() if any(path in value for path in local)] == []
    assert meta["ss_sd_model_name"] == trained["model"].name  # the folder's name
    config = json.loads(meta["training_config"])
    assert config["dataset_path"] == "data" and config["model_name"] == trained["model"].name
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"  # kohya's for SD 1.x/2.x LoRAs
    assert meta["modelspec.title"] == "test-run" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert datetime.fromisoformat(meta["modelspec.date"]).year >= 2025

    minimal = export_with(trained, "minimal.safetensors", metadata="minimal", output_format="kohya")
    with safe_open(str(minimal), "pt") as f:
        assert f.metadata() == {
            "ss_network_dim": "4",
            "ss_network_alpha": "2",
            "ss_base_model_version": "sd_v1",
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.title": "test-run",
            "modelspec.architecture": "stable-diffusion-v1/lora",
            "modelspec.trigger_phrase": "xyz_shape",
        }


def test_the_trigger_phrase_names_every_trigger_of_a_multi_concept_dataset(trained, tmp_path):
    from training.data.dataset import scan_dataset
    from training.data.synthetic import make_shape_dataset

    make_shape_dataset(tmp_path, 1, trigger_word="xyz_shape")  # root images: the config's trigger_word
    make_shape_dataset(tmp_path / "10_xyz_cat", 1)  # the folder's name
    make_shape_dataset(tmp_path / "concept1", 1, trigger_word="ohwx")  # the captions' own
    trainer = trained["trainer"]
    kept = trainer.dataset
    trainer.dataset = scan_dataset(tmp_path, trigger_word="xyz_shape", trigger_words={})
    try:
        for metadata in ("full", "minimal"):
            with safe_open(str(export_with(trained, f"concepts-{metadata}.safetensors", metadata=metadata)), "pt") as f:
                assert f.metadata()["modelspec.trigger_phrase"] == "xyz_shape, xyz_cat, ohwx"
    finally:
        trainer.dataset = kept


def test_files_without_metadata_load_in_diffusers_as_the_full_ones(trained):
    pipe = tiny_pipeline(trained["model"])
    pipe.load_lora_weights(str(trained["kohya"]), adapter_name="full")
    full = latents_of(pipe)
    pipe.delete_adapters("full")
    for output_format in ("kohya", "diffusers"):
        bare = export_with(trained, f"none-{output_format}.safetensors", metadata="none", output_format=output_format)
        with safe_open(str(bare), "pt") as f:
            assert not f.metadata()
        pipe.load_lora_weights(str(bare), adapter_name=output_format)
        assert torch.allclose(latents_of(pipe), full, atol=1e-5), output_format  # alpha 2 / rank 4 kept
        pipe.delete_adapters(output_format)


def test_kohya_and_diffusers_files_load_in_diffusers_and_agree(trained):
    pipe = tiny_pipeline(trained["model"])
    base = latents_of(pipe)
    pipe.load_lora_weights(str(trained["kohya"]), adapter_name="kohya")
    from_kohya = latents_of(pipe)
    pipe.delete_adapters("kohya")
    assert torch.equal(latents_of(pipe), base)

    pipe.load_lora_weights(str(trained["diffusers"]), adapter_name="peft")
    from_diffusers = latents_of(pipe)
    assert (from_kohya - base).abs().max() > 1e-3
    assert torch.allclose(from_kohya, from_diffusers, atol=1e-5)

    pipe.set_adapters(["peft"], [0.0])
    assert torch.equal(latents_of(pipe), base)


def test_text_encoder_lora_changes_the_text_states(trained):
    pipe = tiny_pipeline(trained["model"])
    ids = pipe.tokenizer(["xyz_shape a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids).last_hidden_state
        pipe.load_lora_weights(str(trained["kohya"]), adapter_name="kohya")
        after = pipe.text_encoder(ids).last_hidden_state
    assert (after - before).abs().max() > 1e-4


def test_both_formats_read_back_to_the_same_weights(trained):
    pipe = tiny_pipeline(trained["model"])
    from training.lora import attach_lora

    attach_lora(
        {"unet": pipe.unet, "text_encoder": pipe.text_encoder},
        rank=4,
        alpha=2,
        dropout=0.0,
        seed=0,
        train_text_encoder=True,
    )
    kohya = read_lora_file(trained["kohya"], {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    peft = read_lora_file(trained["diffusers"], {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    assert kohya.keys() == peft.keys()
    for name in kohya:
        assert torch.equal(kohya[name].down, peft[name].down) and torch.equal(kohya[name].up, peft[name].up)
        assert kohya[name].alpha == peft[name].alpha == 2.0


def _unet_output(unet, seed=11):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, 4, 8, 8), generator=generator)
    states = torch.randn((1, 77, 32), generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([400]), states).sample


def test_resume_from_into_a_larger_rank_keeps_the_function(trained, tmp_path):
    reference = tiny_pipeline(trained["model"])
    reference.load_lora_weights(str(trained["kohya"]), adapter_name="stage1")
    expected = _unet_output(reference.unet)

    config = fast_config(
        trained["root"] / "data", rank=8, alpha=8, train_text_encoder=True, resume_from=str(trained["kohya"])
    )
    stage2 = Trainer(config, tmp_path / "stage2")
    stage2.setup()
    stage2.base.denoiser.eval()
    assert torch.allclose(_unet_output(stage2.base.denoiser), expected, atol=1e-5)
    layer = stage2.base.denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.lora_A["default"].weight.shape[0] == 8
    assert torch.count_nonzero(layer.lora_B["default"].weight[:, 4:]) == 0  # new directions start with no effect
    stage2.train()  # and they train
    assert torch.count_nonzero(layer.lora_B["default"].weight[:, 4:]) > 0


def test_resume_from_a_run_name_finds_its_lora(tmp_path, shapes, workspace):
    first = run_training(fast_config(shapes, name="stage-one", steps=2), None)
    assert first.state == "completed"
    assert first.run_dir.parent == workspace / "runs"
    second = run_training(
        fast_config(shapes, name="stage-two", steps=1, rank=8, resume_from="stage-one"), tmp_path / "two"
    )
    assert second.state == "completed", second.error
    assert str(first.lora_path) in (tmp_path / "two" / "train.log").read_text()


def test_resume_from_a_name_finds_the_latest_run_of_either_folder_form(tmp_path, monkeypatch):
    """lora-train's run folders are <name>-<date>-<time>, the server's <name>-<date>-<time>-<4 hex>: the latest
    run of that name that left a LoRA wins, and a config whose name only starts the same is another run."""
    monkeypatch.setenv("LORA_MCP_HOME", str(tmp_path))
    made = {}
    for folder in (
        "stage1-20260101-090000",  # lora-train
        "stage1-20260102-090000-3fa2",  # a server job
        "stage1-b-20260103-090000-0c1d",  # config stage1-b
        "stage1-20260104-090000-9e0f",  # failed before its first checkpoint: no LoRA
    ):
        run = tmp_path / "runs" / folder
        run.mkdir(parents=True)
        if folder != "stage1-20260104-090000-9e0f":
            made[folder] = run / "lora.safetensors"
            made[folder].write_bytes(b"a LoRA")
    assert find_resume_lora("stage1") == made["stage1-20260102-090000-3fa2"]
    assert find_resume_lora("stage1-b") == made["stage1-b-20260103-090000-0c1d"]
    with pytest.raises(ResumeSourceError, match="'stage2'.*start-training"):
        find_resume_lora("stage2")


def test_resume_from_refuses_what_it_cannot_continue(trained, tmp_path, shapes):
    smaller = run_training(
        fast_config(shapes, rank=2, resume_from=str(trained["kohya"]), train_text_encoder=True), tmp_path / "a"
    )
    assert smaller.state == "failed" and "rank 4" in smaller.error

    without_te = run_training(fast_config(shapes, rank=4, resume_from=str(trained["kohya"])), tmp_path / "b")
    assert without_te.state == "failed" and "train_text_encoder" in without_te.error

    missing = run_training(fast_config(shapes, resume_from="no-such-run"), tmp_path / "c")
    assert missing.state == "failed" and "no-such-run" in missing.error

    foreign = tmp_path / "foreign.safetensors"
    save_file(
        {
            "lora_unet_not_a_module.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_not_a_module.lora_up.weight": torch.zeros(8, 4),
        },
        str(foreign),
    )
    other = run_training(fast_config(shapes, resume_from=str(foreign)), tmp_path / "d")
    assert other.state == "failed" and "no layer of this base model" in other.error

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    broken = run_training(fast_config(shapes, resume_from=str(garbage)), tmp_path / "e")
    assert broken.state == "failed" and "not a readable" in broken.error


def test_conversion_between_formats_is_lossless(trained, tmp_path):
    from training.convert import convert_lora_file

    to_diffusers = convert_lora_file(trained["kohya"], tmp_path / "converted.safetensors", "diffusers")
    back = convert_lora_file(to_diffusers, tmp_path / "back.safetensors", "kohya", model_folder=trained["model"])
    with safe_open(str(trained["kohya"]), "pt") as a, safe_open(str(back), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key).float(), b.get_tensor(key).float()), key
        assert json.loads(b.metadata()["training_config"])["output_format"] == "kohya"

    pipe = tiny_pipeline(trained["model"])
    pipe.load_lora_weights(str(trained["kohya"]), adapter_name="original")
    original = latents_of(pipe)
    pipe.delete_adapters("original")
    pipe.load_lora_weights(str(to_diffusers), adapter_name="converted")
    assert torch.allclose(latents_of(pipe), original, atol=1e-5)
