"""merge-loras and convert-lora: a merge at strength 1 gives the image of its sources stacked at their
weights, incompatible inputs are refused before anything is written, conversion is lossless (and
"comfyui" is the kohya layout), and the service functions resolve names and paths safely."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import get_args

import pytest
import torch
from conftest import fast_config, tiny_pipeline
from safetensors import safe_open
from safetensors.torch import save_file

from server.errors import ServiceError
from server.lora_tools import LoraTarget, MergeSource, convert_lora, lora_path, merge_loras
from server.loras import LoraService
from training import merge as merge_module
from training.convert import LoraFormat, convert_lora_file
from training.lora import LoraFileError, read_lora_file
from training.merge import merge_lora_files
from training.trainer import run_training


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_sd15, tiny_sd2v):
    """Two different trained LoRAs of the tiny SD 1.x model and one of the tiny SD 2.x model.

    a: kohya, UNet + text encoder, rank 4, alpha 4, its own dataset and seed.
    b: diffusers layout, UNet only (so the text-encoder modules are a's alone), rank 4, alpha 2.
    """
    from training.data.synthetic import make_shape_dataset

    root = tmp_path_factory.mktemp("merge")
    make_shape_dataset(root / "data-a", 4, trigger_word="xyz_shape", seed=0)
    make_shape_dataset(root / "data-b", 4, trigger_word="abc_shape", seed=5)
    common = dict(steps=6, rank=4, learning_rate=5e-3)
    runs = {
        "a": fast_config(root / "data-a", name="lora-a", alpha=4, seed=1, train_text_encoder=True, **common),
        "b": fast_config(
            root / "data-b",
            name="lora-b",
            alpha=2,
            seed=2,
            trigger_word="abc_shape",
            output_format="diffusers",
            **common,
        ),
        "sd2": fast_config(root / "data-a", name="lora-sd2", model_name="builtin:tiny-sd2-v", steps=1),
    }
    files = {}
    for key, config in runs.items():
        result = run_training(config, root / f"run-{key}")
        assert result.state == "completed", result.error
        files[key] = result.lora_path
    return {**files, "model": tiny_sd15, "root": root}


def latents_of(pipe):
    generator = torch.Generator().manual_seed(3)
    return pipe(
        "xyz_shape abc_shape a blue square",
        num_inference_steps=3,
        height=64,
        width=64,
        generator=generator,
        output_type="latent",
    ).images


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def merged(loras, tmp_path_factory):
    """a at 1.0 + b at 0.5, in the kohya layout."""
    return merge_lora_files(
        [(loras["a"], 1.0), (loras["b"], 0.5)], tmp_path_factory.mktemp("merged") / "ab.safetensors"
    )


def test_merge_at_strength_one_equals_the_loras_stacked_at_their_weights(loras, merged):
    pipe = tiny_pipeline(loras["model"])
    base = latents_of(pipe)
    pipe.load_lora_weights(str(loras["a"]), adapter_name="a")
    pipe.load_lora_weights(str(loras["b"]), adapter_name="b")
    pipe.set_adapters(["a", "b"], [1.0, 0.0])
    a_alone = latents_of(pipe)
    pipe.set_adapters(["a", "b"], [1.0, 0.5])
    stacked = latents_of(pipe)
    pipe.delete_adapters(["a", "b"])
    pipe.load_lora_weights(str(merged), adapter_name="merged")
    from_merge = latents_of(pipe)

    assert (a_alone - base).abs().max() > 1e-3 and (stacked - a_alone).abs().max() > 1e-3  # both LoRAs act
    # The same products summed in another order (one rank-8 matmul instead of two rank-4 ones and an add):
    # float32 rounding, ~1e-7 relative per layer, grows through the UNet, 3 steps and guidance 7.5 to ~1e-5
    # on latents of magnitude ~9 (1e-6 relative). 1e-4 is still 1000x below b's own effect (~0.2 here).
    assert torch.allclose(from_merge, stacked, atol=1e-4), (from_merge - stacked).abs().max()


def test_merged_weights_are_the_weighted_sum_and_name_real_modules(loras, merged):
    pipe = tiny_pipeline(loras["model"])
    a = read_lora_file(loras["a"], {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    b = read_lora_file(loras["b"], {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    result = read_lora_file(
        merged, {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    )  # refuses any key that names no module

    assert set(result) == set(a) | set(b) and set(b) < set(a)  # b has no text-encoder modules
    for name, w in result.items():
        assert w.down.shape[0] == 8 and w.alpha == 8.0  # rank 4 + 4, scale 1
        expected = sum(
            (weight * lora[name].alpha / 4) * lora[name].up @ lora[name].down
            for lora, weight in ((a, 1.0), (b, 0.5))
            if name in lora
        )
        assert torch.allclose(w.up @ w.down, expected, atol=1e-7), name
        if name not in b:
            assert not w.up[:, 4:].any() and not w.down[4:].any()  # b's block is zero
    stems = {key.split(".")[0] for key in tensors_of(merged)}
    assert all(stem.startswith(("lora_unet_", "lora_te_")) for stem in stems)

    meta = metadata_of(merged)
    sources = json.loads(meta["ss_merged_from"])
    assert [(s["file"], s["weight"], s["rank"]) for s in sources] == [
        (loras["a"].name, 1.0, 4),
        (loras["b"].name, 0.5, 4),
    ]
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "8"
    assert meta["modelspec.trigger_phrase"] == "xyz_shape, abc_shape"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_sd_model_name"] == "builtin:tiny-sd15"
    config = json.loads(meta["training_config"])
    assert config["name"] == "lora-a" and config["output_format"] == "kohya"


def test_a_merged_file_converts_like_any_other(loras, merged, tmp_path):
    as_diffusers = merge_lora_files(
        [(loras["a"], 1.0), (loras["b"], 0.5)], tmp_path / "ab-diffusers.safetensors", output_format="diffusers"
    )
    assert json.loads(metadata_of(as_diffusers)["training_config"])["output_format"] == "diffusers"
    back = convert_lora_file(as_diffusers, tmp_path / "ab-kohya.safetensors", "kohya")  # base model from metadata
    expected, got = tensors_of(merged), tensors_of(back)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def _crafted(path: Path, source: Path, change=None, metadata: dict | None = None) -> Path:
    """`source`'s tensors with only `metadata` (no training config), optionally changed."""
    tensors = tensors_of(source)
    if change:
        change(tensors)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _foreign_layer(tensors: dict) -> None:
    tensors["lora_unet_mid_block_not_here.lora_down.weight"] = torch.zeros(4, 32)
    tensors["lora_unet_mid_block_not_here.lora_up.weight"] = torch.zeros(32, 4)


def _wider_first_layer(tensors: dict) -> None:
    stem = sorted(key for key in tensors if key.endswith(".lora_down.weight"))[0].removesuffix(".lora_down.weight")
    down = tensors[f"{stem}.lora_down.weight"]
    tensors[f"{stem}.lora_down.weight"] = torch.cat([down, down[:, :1]], dim=1)  # one input feature too many


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("one source", "at least 2"),
        ("weight 5", "weight of .* is 5"),
        ("weight nan", "weight of .* is nan"),
        ("another base model", "different base models .*version"),
        ("another base model version", "different base models .*sd_v1.*sd_v2_v"),
        ("a layer the base model lacks", "x.safetensors: .*no layer of this base model"),
        ("a layer of another shape", r"takes A \(4, 32\), B \(32, 4\): another architecture"),
        ("rank above the cap", "rank 8"),
    ],
)
def test_merge_refuses_incompatible_inputs_and_writes_nothing(loras, tmp_path, monkeypatch, case, message):
    # Without metadata the tiny SD 2.x LoRA could not be told apart: its attention projections have the
    # shapes of the tiny SD 1.x ones (real SD 1.x / 2.x differ: 768 vs 1024 text features).
    a, b = (loras["a"], 1.0), (loras["b"], 0.5)
    v2 = {"ss_base_model_version": "sd_v2_v", "ss_v2": "True"}
    sources = {
        "one source": [a],
        "weight 5": [a, (loras["b"], 5.0)],
        "weight nan": [a, (loras["b"], math.nan)],
        "another base model": [a, (loras["sd2"], 1.0)],
        "another base model version": [a, (_crafted(tmp_path / "v2.safetensors", loras["b"], metadata=v2), 1.0)],
        "a layer the base model lacks": [a, (_crafted(tmp_path / "x.safetensors", loras["a"], _foreign_layer), 1.0)],
        "a layer of another shape": [a, (_crafted(tmp_path / "wide.safetensors", loras["a"], _wider_first_layer), 1.0)],
        "rank above the cap": [a, b],
    }[case]
    if case == "rank above the cap":
        monkeypatch.setattr(merge_module, "MAX_MERGED_RANK", 6)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LoraFileError, match=message):
        merge_lora_files(sources, out / "merged.safetensors")
    assert list(out.iterdir()) == []


def test_convert_to_comfyui_writes_kohya_keys_with_the_same_output(loras, tmp_path):
    comfy = convert_lora_file(loras["b"], tmp_path / "b-comfyui.safetensors", "comfyui")
    keys = tensors_of(comfy).keys()
    assert keys and all(key.startswith("lora_unet_") for key in keys)
    assert {key.split(".", 1)[1] for key in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert json.loads(metadata_of(comfy)["training_config"])["output_format"] == "kohya"

    pipe = tiny_pipeline(loras["model"])
    pipe.load_lora_weights(str(loras["b"]), adapter_name="source")
    expected = latents_of(pipe)
    pipe.delete_adapters("source")
    pipe.load_lora_weights(str(comfy), adapter_name="comfy")
    assert torch.allclose(latents_of(pipe), expected, atol=1e-6)  # the same tensors: equal here, in fact


@pytest.mark.parametrize(("key", "there", "back"), [("a", "diffusers", "kohya"), ("b", "kohya", "diffusers")])
def test_round_trips_keep_every_tensor_exactly(loras, tmp_path, key, there, back):
    middle = convert_lora_file(loras[key], tmp_path / "middle.safetensors", there)
    again = convert_lora_file(middle, tmp_path / "again.safetensors", back)
    original, final = tensors_of(loras[key]), tensors_of(again)
    assert original.keys() == final.keys()
    for name in original:
        assert original[name].dtype == final[name].dtype and torch.equal(original[name], final[name]), name


def test_convert_refuses_an_unknown_format(loras, tmp_path):
    with pytest.raises(LoraFileError, match="unknown LoRA format 'a1111'"):
        convert_lora_file(loras["a"], tmp_path / "x.safetensors", "a1111")
    assert not (tmp_path / "x.safetensors").exists()


def test_service_formats_are_the_converters():
    assert get_args(LoraTarget) == get_args(LoraFormat)


@pytest.fixture
def service_workspace(loras, tmp_path, monkeypatch):
    """A workspace with a and b exported as lora-a / lora-b, and the sd2 LoRA as a loose file in it."""
    monkeypatch.delenv("LORA_MCP_ALLOWED_DIRS", raising=False)
    workspace = tmp_path / "workspace"
    (workspace / "loras").mkdir(parents=True)
    (workspace / "files").mkdir()
    shutil.copyfile(loras["a"], workspace / "loras" / "lora-a.safetensors")
    shutil.copyfile(loras["b"], workspace / "loras" / "lora-b.safetensors")
    shutil.copyfile(loras["sd2"], workspace / "files" / "sd2.safetensors")
    return workspace


def test_lora_references_resolve_to_exported_names_or_allowed_paths(service_workspace, loras):
    ws = service_workspace
    assert lora_path(ws, "lora-a") == lora_path(ws, "lora-a.safetensors") == ws / "loras" / "lora-a.safetensors"
    assert lora_path(ws, "files/sd2.safetensors") == (ws / "files" / "sd2.safetensors").resolve()
    assert lora_path(ws, str(ws / "files" / "sd2.safetensors")) == (ws / "files" / "sd2.safetensors").resolve()
    (ws / "files" / "broken.safetensors").write_bytes(b"not a safetensors file")
    (ws / "files" / "notes.txt").write_text("x")
    refusals = {
        "no-such-lora": "no exported LoRA named 'no-such-lora' .*lora-a, lora-b.*list-exported-models",
        "..": "outside the folders",
        "../x": "outside the folders this server may use",
        "../loras/lora-a.safetensors": "outside the folders",
        str(loras["a"]): "outside the folders",
        "files/notes.txt": "not a .safetensors file",
        "files/missing.safetensors": "not a .safetensors file",
        "files/broken.safetensors": "not a valid .safetensors file",
    }
    for reference, message in refusals.items():
        with pytest.raises(ServiceError, match=message):
            lora_path(ws, reference)


def test_merge_service_writes_the_lora_and_its_sidecar(service_workspace):
    ws = service_workspace
    sources = [
        {"lora": "lora-a", "weight": 1.0},
        MergeSource(lora=str(ws / "loras" / "lora-b.safetensors"), weight=0.5),
    ]
    record = merge_loras(ws, sources, "merged-ab", "kohya")
    target = ws / "loras" / "merged-ab.safetensors"
    assert record.name == "merged-ab" and record.path == str(target) and record.size_bytes == target.stat().st_size
    assert record.trigger_word == "xyz_shape, abc_shape" and record.base_model == "builtin:tiny-sd15"
    assert record.output_format == "kohya"
    assert json.loads(target.with_suffix(".json").read_text()) == record.model_dump(mode="json")
    assert record in LoraService(ws).list()

    for name in ("merged-ab", "lora-a.safetensors"):
        with pytest.raises(ServiceError, match="exists already"):
            merge_loras(ws, sources, name, "kohya")
    with pytest.raises(ServiceError, match="output name '../x' is not allowed"):
        merge_loras(ws, sources, "../x", "kohya")
    assert target.read_bytes()  # untouched


def test_merge_service_refuses_with_the_reason_and_writes_nothing(service_workspace):
    ws = service_workspace
    before = sorted(p.name for p in (ws / "loras").iterdir())
    cases = [
        ([{"lora": "lora-a"}, {"lora": "files/sd2.safetensors"}], "kohya", "different base models"),
        ([{"lora": "lora-a"}], "kohya", "at least 2"),
        ([{"lora": "lora-a"}, {"lora": "lora-b", "weight": 5}], "kohya", "weights from -2 to 2"),
        ([{"lora": "lora-a"}, {"lora": "lora-b"}], "a1111", "unknown LoRA format"),
    ]
    for sources, output_format, message in cases:
        with pytest.raises(ServiceError, match=message):
            merge_loras(ws, sources, "refused", output_format)
    assert sorted(p.name for p in (ws / "loras").iterdir()) == before


def test_convert_service_names_the_output_after_the_source_and_format(service_workspace):
    ws = service_workspace
    record = convert_lora(ws, "lora-b", "comfyui")
    assert record.name == "lora-b-comfyui" and record.output_format == "kohya"
    assert record.trigger_word == "abc_shape" and record.base_model == "builtin:tiny-sd15"
    assert all(key.startswith("lora_unet_") for key in tensors_of(Path(record.path)))
    assert json.loads((ws / "loras" / "lora-b-comfyui.json").read_text())["output_format"] == "kohya"

    named = convert_lora(ws, "lora-a", "diffusers", "a-for-diffusers")
    assert named.path == str(ws / "loras" / "a-for-diffusers.safetensors") and named.output_format == "diffusers"
    # The default name is numbered when taken; a name given is exact, and a taken one is refused.
    assert convert_lora(ws, "lora-b", "comfyui").name == "lora-b-comfyui-2"
    with pytest.raises(ServiceError, match="exists already in loras/ and is never overwritten"):
        convert_lora(ws, "lora-b", "comfyui", "a-for-diffusers")
    assert named.output_format == json.loads((ws / "loras" / "a-for-diffusers.json").read_text())["output_format"]
    with pytest.raises(ServiceError, match="outside the folders"):
        convert_lora(ws, "../x.safetensors", "kohya")
