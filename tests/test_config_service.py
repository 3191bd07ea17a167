"""ConfigService: saved configs as real YAML files in a temporary workspace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from server.configs import ConfigService, ConfigSummary, ValidationReport
from server.errors import ServiceError
from training.config import TrainingConfig
from training.data.synthetic import make_shape_dataset

BAD_NAMES = ["../x", "a/b", "/abs", "", ".."]


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def service(tmp_path, monkeypatch) -> ConfigService:
    monkeypatch.setenv("LORA_MCP_ALLOWED_DIRS", "/data")  # where the examples below keep their datasets
    return ConfigService(tmp_path)


def values(dataset: Path | str = "/data/set", **extra) -> dict:
    return {"name": "my-lora", "model_name": "builtin:tiny-sd15", "dataset_path": str(dataset), **extra}


# --- round trip ------------------------------------------------------------------------------


def test_create_get_list_update_delete_round_trip(service, tmp_path):
    created = service.create(values(steps=200, rank=8))
    assert isinstance(created, TrainingConfig)
    assert (tmp_path / "configs" / "my-lora.yaml").is_file()

    got = service.get("my-lora")
    assert got == created
    assert got.steps == 200 and got.rank == 8 and got.learning_rate == pytest.approx(2e-4)

    service.create(values(name="other", dataset_path="/data/other"))
    summaries = service.list()
    assert [s.name for s in summaries] == ["my-lora", "other"]
    assert all(isinstance(s, ConfigSummary) for s in summaries)
    first, second = summaries
    assert (first.model_name, first.dataset_path, first.steps) == ("builtin:tiny-sd15", "/data/set", 200)
    assert second.steps is None  # left to the default
    assert first.updated_at == pytest.approx(os.stat(tmp_path / "configs" / "my-lora.yaml").st_mtime)

    updated = service.update("my-lora", {"rank": 16, "trigger_word": "xyz_style"})
    assert updated.rank == 16 and updated.trigger_word == "xyz_style" and updated.steps == 200
    assert service.get("my-lora") == updated

    service.delete("my-lora")
    assert not (tmp_path / "configs" / "my-lora.yaml").exists()
    assert [s.name for s in service.list()] == ["other"]


def test_list_of_an_empty_workspace_is_empty(service):
    assert service.list() == []


def test_yaml_holds_only_the_given_values(service):
    service.create(values(learning_rate=1e-4, test_prompts=["xyz a cat"]))
    text = service.get_yaml("my-lora")
    assert yaml.safe_load(text) == {
        "name": "my-lora",
        "model_name": "builtin:tiny-sd15",
        "dataset_path": "/data/set",
        "learning_rate": 1e-4,
        "test_prompts": ["xyz a cat"],
    }
    assert text.startswith("name: my-lora\n")
    assert (service.folder / "my-lora.yaml").read_text(encoding="utf-8") == text


def test_aliases_are_stored_under_the_field_name_and_update_through_them(service):
    service.create(values(lr=1e-4))
    assert yaml.safe_load(service.get_yaml("my-lora"))["learning_rate"] == 1e-4
    assert service.update("my-lora", {"lr": 3e-4}).learning_rate == pytest.approx(3e-4)
    assert yaml.safe_load(service.get_yaml("my-lora"))["learning_rate"] == 3e-4


def test_update_to_none_restores_the_default(service):
    service.create(values(steps=500, rank=8))
    config = service.update("my-lora", {"steps": None, "rank": None})
    assert config.steps is None and config.rank == 32
    stored = yaml.safe_load(service.get_yaml("my-lora"))
    assert "steps" not in stored and "rank" not in stored


# --- refused input -----------------------------------------------------------------------------


def test_invalid_values_name_every_field_and_write_nothing(service, tmp_path):
    before = files_under(tmp_path)
    with pytest.raises(ServiceError) as info:
        service.create(values(resolution=30, optimizer="adam"))
    message = str(info.value)
    assert "resolution" in message and "30" in message
    assert "optimizer" in message and "adam" in message
    assert files_under(tmp_path) == before
    assert not (tmp_path / "configs" / "my-lora.yaml").exists()


def test_unknown_option_is_refused(service):
    with pytest.raises(ServiceError, match="unknown option 'learning_rat'"):
        service.create(values(learning_rat=1e-4))


def test_missing_name_is_refused(service):
    with pytest.raises(ServiceError, match="name is required"):
        service.create({"dataset_path": "/data/set"})


def test_duplicate_create_is_refused(service):
    service.create(values(rank=8))
    original = service.get_yaml("my-lora")
    with pytest.raises(ServiceError) as info:
        service.create(values(rank=16))
    assert "update-training-config" in str(info.value) and "delete-config" in str(info.value)
    assert service.get_yaml("my-lora") == original


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_names_are_refused_and_write_nothing(service, tmp_path, bad):
    service.create(values())  # something a traversal could reach
    before = files_under(tmp_path)
    before_parent = files_under(tmp_path.parent)
    calls = [
        lambda: service.create(values(name=bad)),
        lambda: service.get(bad),
        lambda: service.get_yaml(bad),
        lambda: service.update(bad, {"rank": 4}),
        lambda: service.delete(bad),
        lambda: service.validate(bad),
    ]
    for call in calls:
        with pytest.raises(ServiceError, match="config name"):
            call()
    assert files_under(tmp_path) == before
    assert files_under(tmp_path.parent) == before_parent
    assert service.get("my-lora").name == "my-lora"


def test_non_string_name_is_a_service_error(service):
    with pytest.raises(ServiceError):
        service.create(values(name=7))
    with pytest.raises(ServiceError):
        service.get(None)  # type: ignore[arg-type]


def test_invalid_update_leaves_the_file_byte_identical(service):
    service.create(values(rank=8))
    path = service.folder / "my-lora.yaml"
    original = path.read_bytes()
    for change in ({"rank": 0}, {"optimizer": "adam"}, {"no_such_option": 1}, {"crop": "random"}):
        with pytest.raises(ServiceError, match="not updated"):
            service.update("my-lora", change)
        assert path.read_bytes() == original
    assert sorted(p.name for p in service.folder.iterdir()) == ["my-lora.yaml"]  # no temporary files left


def test_update_cannot_rename(service):
    service.create(values())
    original = service.get_yaml("my-lora")
    with pytest.raises(ServiceError, match="create a new config instead"):
        service.update("my-lora", {"name": "renamed"})
    assert service.get_yaml("my-lora") == original
    assert not (service.folder / "renamed.yaml").exists()
    assert service.update("my-lora", {"name": "my-lora", "rank": 4}).rank == 4  # the same name is no rename


@pytest.mark.parametrize("operation", ["get", "get_yaml", "update", "delete", "validate"])
def test_unknown_name_suggests_list_configs(service, operation):
    service.create(values())
    args = ("missing", {"rank": 4}) if operation == "update" else ("missing",)
    with pytest.raises(ServiceError) as info:
        getattr(service, operation)(*args)
    assert "'missing'" in str(info.value) and "list-configs" in str(info.value)


def test_a_hand_edited_invalid_file_is_reported_and_can_be_fixed(service):
    service.create(values())
    path = service.folder / "my-lora.yaml"
    path.write_text(path.read_text() + "rank: 0\n", encoding="utf-8")

    with pytest.raises(ServiceError, match="rank"):
        service.get("my-lora")
    (summary,) = service.list()
    assert summary.error and "rank" in summary.error
    report = service.validate("my-lora")
    assert not report.valid and any("rank" in e for e in report.errors)

    assert service.update("my-lora", {"rank": 4}).rank == 4
    assert service.list()[0].error is None


def test_an_invalid_file_with_unbounded_options_still_has_its_dataset_and_model_checked(service, shapes, tiny_sd15):
    """Options without bounds (trigger_word, model_family) are read on their own while another option is
    invalid, so the dataset's trigger-word check and the model's family still run."""
    service.create(values(shapes, trigger_word="xyz_shape", model_family="sd1"))
    path = service.folder / "my-lora.yaml"
    path.write_text(path.read_text() + "rank: 0\n", encoding="utf-8")

    report = service.validate("my-lora")
    assert not report.valid and any("rank" in e for e in report.errors)
    assert report.images == 4 and report.native_resolution == 64
    assert service.list()[0].model_name == "builtin:tiny-sd15"


def test_a_file_that_is_not_yaml_gives_a_service_error(service):
    service.create(values())
    (service.folder / "my-lora.yaml").write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(ServiceError, match="not valid YAML"):
        service.get("my-lora")
    assert service.list()[0].error
    service.delete("my-lora")
    assert service.list() == []


# --- validate ------------------------------------------------------------------------------------


def test_validate_a_good_config(service, shapes, tiny_sd15):
    service.create(values(shapes, trigger_word="xyz_shape"))
    report = service.validate("my-lora")
    assert isinstance(report, ValidationReport)
    assert report.valid, report.errors
    assert report.errors == []
    assert report.images == 4
    assert report.native_resolution == 64
    assert "steps not set: the run will use 100 x 4 images = 400 steps" in report.warnings


def test_validate_includes_the_config_warnings(service, shapes, tiny_sd15):
    service.create(values(shapes, steps=10, lr_warmup_steps=5, resolution=64))
    report = service.validate("my-lora")
    assert report.valid
    assert any("lr_warmup_steps" in w for w in report.warnings)
    assert not any(w.startswith("steps not set") for w in report.warnings)


def test_validate_a_missing_dataset(service, tmp_path, tiny_sd15):
    service.create(values(tmp_path / "no-such-folder"))
    report = service.validate("my-lora")
    assert not report.valid
    assert any("dataset" in e for e in report.errors)
    assert report.images is None
    assert report.native_resolution == 64  # the model is still checked


def test_validate_an_empty_dataset(service, tmp_path, tiny_sd15):
    (tmp_path / "empty").mkdir()
    service.create(values(tmp_path / "empty"))
    report = service.validate("my-lora")
    assert not report.valid
    assert any("no training images" in e for e in report.errors)


def test_validate_an_unknown_model(service, shapes):
    service.create(values(shapes, model_name="someone/not-cached"))
    report = service.validate("my-lora")
    assert not report.valid
    assert any("someone/not-cached" in e for e in report.errors)
    assert report.images == 4 and report.native_resolution is None


def test_validate_a_dataset_given_by_name(service, tmp_path, tiny_sd15, monkeypatch):
    monkeypatch.setenv("LORA_MCP_HOME", str(tmp_path))
    make_shape_dataset(tmp_path / "datasets" / "my-shapes", 3, trigger_word="xyz_shape")
    # A folder model (not a built-in id), so the new workspace does not build its own copy.
    service.create(values("my-shapes", model_name=str(tiny_sd15), steps=30))
    report = service.validate("my-lora")
    assert report.valid, report.errors
    assert report.images == 3 and report.native_resolution == 64


def test_validate_reports_dataset_warnings(service, tmp_path, tiny_sd15):
    make_shape_dataset(tmp_path / "set", 2, trigger_word="xyz_shape")
    next((tmp_path / "set").glob("*.txt")).unlink()
    service.create(values(tmp_path / "set", trigger_word="xyz_shape", steps=5))
    report = service.validate("my-lora")
    assert report.valid
    assert any("no caption" in w for w in report.warnings)


# --- folders outside the workspace ---------------------------------------------------------------


def test_paths_outside_the_allowed_folders_are_refused(service, tmp_path, monkeypatch):
    before = files_under(tmp_path)
    for field, value in (("dataset_path", "/etc"), ("dataset_path", "../outside"), ("class_data_dir", "/tmp/x")):
        with pytest.raises(ServiceError, match="LORA_MCP_ALLOWED_DIRS"):
            service.create(values(**{field: value}))
    assert files_under(tmp_path) == before

    (tmp_path / "escape").symlink_to("/etc")  # inside the workspace by name, outside by target
    with pytest.raises(ServiceError, match="outside"):
        service.create(values(dataset_path=str(tmp_path / "escape")))

    service.create(values(dataset_path="/data/set"))  # an allowed folder
    service.create(values(name="by-name", dataset_path="my-dataset"))  # a dataset name, not a path
    with pytest.raises(ServiceError, match="outside"):
        service.update("my-lora", {"resume_from": "/home/someone/lora.safetensors"})
    assert service.get("my-lora").resume_from is None

    monkeypatch.setenv("LORA_MCP_ALLOWED_DIRS", "")
    with pytest.raises(ServiceError):
        service.create(values(name="now-refused", dataset_path="/data/set"))


def test_validate_shows_the_preflight_rules(service, shapes, tiny_sd15):
    service.create(values(shapes, trigger_word="style", steps=10, learning_rate=0.01))
    report = service.validate("my-lora")
    rules = {w.split("]")[0].lstrip("[") for w in report.warnings if w.startswith("[")}
    assert {"generic-trigger-word", "steps-vs-images", "learning-rate"} <= rules
    assert report.valid  # warnings do not stop a run


def test_a_family_override_that_contradicts_the_models_files_is_an_error(service, tiny_sdxl, shapes):
    service.create(values(shapes, name="xl", model_name="builtin:tiny-sdxl"))
    assert service.validate("xl").valid  # SDXL trains
    service.create(values(shapes, name="forced", model_name="builtin:tiny-sd15", model_family="flux"))
    assert any("model_family is flux, but the files" in error for error in service.validate("forced").errors)


def test_options_that_do_not_fit_flux_are_errors_before_a_run(service, shapes):
    service.create(values(shapes, name="flux", model_name="builtin:tiny-flux"))
    assert service.validate("flux").valid  # FLUX trains
    service.update("flux", {"train_text_encoder": True, "min_snr_gamma": 5, "output_format": "kohya"})
    errors = service.validate("flux").errors
    assert len(errors) == 3
    assert errors[0].startswith("train_text_encoder: FLUX LoRAs train the transformer only")
    assert errors[1].startswith("min_snr_gamma weighs DDPM timesteps")
    assert errors[2].startswith("output_format kohya: kohya's FLUX layout")


def test_a_flux_single_file_without_its_models_folder_is_an_error_before_a_run(service, shapes, tmp_path):
    import torch
    from safetensors.torch import save_file

    checkpoint = tmp_path / "flux1-dev.safetensors"  # BFL's layout: the transformer alone
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(4)}, str(checkpoint))
    service.create(values(shapes, name="flux-file", model_name=str(checkpoint)))
    errors = service.validate("flux-file").errors
    assert len(errors) == 1 and "holds the transformer only: set base_model_config" in errors[0]
