"""Configs of other trainers (issue 15 item 6): a kohya sd-scripts config with its dataset TOML and an ai-toolkit
FLUX YAML (tests/data/imports/, written after the tools' documented examples) become configs of ours, through
the library, `import-config` over the real stdio client (then validated and trained on a tiny model) and
`lora-train --import`; what cannot be mapped is listed; bad input is refused with nothing written;
`[trigger]` in captions and prompts becomes the trigger word."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_mcp_server import REPO, run_session, server_workspace, wait_for_state  # noqa: F401 (a fixture)

from training.config import TrainingConfig
from training.config_import import ConfigImportError, import_config
from training.data.dataset import scan_dataset
from training.data.synthetic import make_shape_dataset
from training.sampling import control_prompt, rendered_prompts

DATA = Path(__file__).parent / "data" / "imports"
KOHYA = DATA / "kohya_lora.toml"
AI_TOOLKIT = DATA / "ai_toolkit_flux.yaml"


def read_beside(given: str) -> str:
    return (DATA / given).read_text(encoding="utf-8")


def unmapped_keys(unmapped) -> set[str]:
    return {item.key if hasattr(item, "key") else item["key"] for item in unmapped}


def test_a_kohya_config_and_its_dataset_toml_become_our_options():
    result = import_config(KOHYA.read_text(), name="cat", read_file=read_beside)
    assert result.format == "kohya"
    values = result.stored_values()
    assert values | {
        "model_name": "/models/sd15/v1-5-pruned-emaonly.safetensors",
        "dataset_path": "/data/lora/10_xyz_cat",  # the dataset TOML's image_dir wins, as in kohya
        "rank": 32,
        "alpha": 16.0,
        "dropout": 0.1,
        "optimizer": "adamw8bit",
        "learning_rate": 1e-4,
        "text_encoder_lr": 5e-5,
        "train_text_encoder": True,  # kohya trains the text encoder unless network_train_unet_only
        "lr_scheduler": "cosine_with_restarts",
        "lr_warmup_steps": 80,  # kohya's 0.05 of 1600 steps
        "steps": 1600,
        "batch_size": 2,
        "resolution": 512,
        "shuffle_captions": True,
        "keep_tokens": 1,
        "flip_aug": True,
        "mixed_precision": "fp16",
        "clip_skip": 2,
        "max_token_length": 150,
        "instance_prompt": "xyz_cat cat",
        "prior_preservation": True,
        "class_data_dir": "/data/lora/reg_cat",
        "class_prompt": "cat",
        "prior_loss_weight": 0.8,
        "test_prompts": ["xyz_cat cat sitting on a windowsill, morning light", "xyz_cat cat asleep in a basket"],
        "save_every": 200,
        "sample_every": 200,
    } == values
    reasons = {item.key: item.reason for item in result.unmapped}
    assert {"xformers", "network_args.conv_dim", "max_train_epochs", "output_dir", "num_repeats"} <= set(reasons)
    assert reasons["xformers"].startswith("no equivalent")
    assert "steps" in reasons["max_train_epochs"]
    assert "mixed_precision" not in reasons and "network_dim" not in reasons


def test_an_ai_toolkit_flux_yaml_becomes_our_options():
    result = import_config(AI_TOOLKIT.read_text(), name="flux", format="ai-toolkit")
    values = result.stored_values()
    assert values | {
        "model_name": "black-forest-labs/FLUX.1-dev",
        "dataset_path": "/home/me/datasets/xyz_flux",
        "trigger_word": "xyz_flux",
        "rank": 16,
        "alpha": 16.0,
        "resolution": 1024,
        "steps": 2000,
        "learning_rate": 1e-4,  # YAML reads 1e-4 as a string; the config makes it a number
        "optimizer": "adamw8bit",
        "mixed_precision": "bf16",
        "quantize_base": "8bit",
        "caption_dropout_rate": 0.05,
        "sample_guidance_scale": 4.0,
        "keep_last_n_checkpoints": 4,
    } == values
    assert values["test_prompts"][0].startswith("[trigger] holding a sign")
    reasons = {item.key: item.reason for item in result.unmapped}
    assert {"train.ema_config", "train.noise_scheduler", "save.dtype", "config.name"} <= set(reasons)
    assert "trained at the largest, 1024" in reasons["datasets[0].resolution"]


def test_ai_toolkits_unet_lr_wins_over_lr_and_the_sample_seed_is_not_the_run_seed():
    data = yaml.safe_load(AI_TOOLKIT.read_text())
    train = data["config"]["process"][0]["train"]
    data["config"]["process"][0]["train"] = {"unet_lr": 3e-4, **train, "lr": 1e-4}  # unet_lr first, lr after it
    data["config"]["process"][0]["sample"]["seed"] = 7
    result = import_config(yaml.safe_dump(data), name="rates", format="ai-toolkit")
    assert result.config.learning_rate == 3e-4
    assert result.config.seed == TrainingConfig.model_fields["seed"].default  # sample.seed 7 is not the run's
    assert "sample.seed" in unmapped_keys(result.unmapped)


def test_detection_several_processes_and_refused_values():
    data = yaml.safe_load(AI_TOOLKIT.read_text())
    second = {"type": "sd_trainer", "datasets": [{"folder_path": "/x"}]}
    data["config"]["process"][0]["network"]["linear"] = 5000  # over our rank's bound
    data["config"]["process"].append(second)
    result = import_config(yaml.safe_dump(data), name="two")
    assert result.format == "ai-toolkit"
    reasons = {item.key: item.reason for item in result.unmapped}
    assert reasons["config.process[1]"] == "value not supported: several processes: the first is used"
    assert reasons["network.linear"].startswith("value not supported: rank")
    assert "rank" not in result.stored_values()
    as_json = '{"pretrained_model_name_or_path": "m", "train_data_dir": "/d", "clip_skip": "2", "LoRA_type": "x"}'
    kohya_ss = import_config(as_json, name="gui")  # kohya_ss's GUI JSON, numbers as strings
    assert kohya_ss.format == "kohya" and kohya_ss.config.clip_skip == 2
    assert unmapped_keys(kohya_ss.unmapped) == {"LoRA_type"}


@pytest.mark.parametrize(
    ("text", "fmt", "message"),
    [
        ("a = [1,\n", None, "cannot read it as TOML"),
        ("a = [1,\n", "kohya", "not valid TOML"),
        ("job: extension\nconfig: [unclosed\n", "ai-toolkit", "not valid YAML"),
        ("learning_rate: 1\n", None, "not a config of a known format"),
        ("pretrained_model_name_or_path = 'm'\n", "kohya", "names no images"),
        ("job: extension\nconfig:\n  process:\n    - type: sd_slider\n", None, "only LoRA training"),
    ],
)
def test_bad_sources_are_refused_with_the_reason(text, fmt, message):
    with pytest.raises(ConfigImportError, match=message):
        import_config(text, name="bad", format=fmt)


def test_trigger_placeholders_become_the_trigger_word_in_captions_and_prompts(tmp_path):
    folder = tmp_path / "data"
    images = make_shape_dataset(folder, 2)
    images[0].with_suffix(".txt").write_text("[trigger], a red circle")
    images[1].with_suffix(".txt").write_text("a photo of [trigger] on blue")
    index = scan_dataset(folder, trigger_word="xyz_flux", trigger_words={}, instance_prompt=None)
    captions = sorted(record.caption for record in index.images)
    assert captions == ["a photo of xyz_flux on blue", "xyz_flux, a red circle"]
    config = TrainingConfig(name="t", dataset_path="d", trigger_word="xyz_flux", test_prompts=["[trigger], a dog"])
    assert rendered_prompts(config) == ["xyz_flux, a dog"]
    assert control_prompt(config) == "a dog"


def lora_train(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "training.cli", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_lora_train_import_writes_a_config_and_lists_what_it_left_out(tmp_path):
    out = tmp_path / "cat-lora.yaml"
    done = lora_train("--import", str(KOHYA), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "not imported: xformers: no equivalent" in done.stderr
    config = TrainingConfig.load(out)
    assert config.name == "cat-lora" and config.network_dim is None and config.rank == 32
    assert config.test_prompts[1] == "xyz_cat cat asleep in a basket"  # the prompt file beside the config
    again = lora_train("--import", str(KOHYA), "-o", str(out))
    assert again.returncode == 2 and "exists" in again.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("network_dim = [\n")
    failed = lora_train("--import", str(broken), "-o", str(tmp_path / "x.yaml"), "--format", "kohya")
    assert failed.returncode == 2 and "not valid TOML" in failed.stderr
    assert not (tmp_path / "x.yaml").exists()
    assert lora_train("--import", str(broken), "-o", str(tmp_path / "x.yaml"), "--format", "onetrainer").returncode == 2
    assert lora_train("--import", str(broken)).returncode == 2  # -o is required


FAST = {"resolution": 64, "steps": 2, "batch_size": 1, "gradient_accumulation_steps": 1, "optimizer": "adamw"}
FAST |= {"mixed_precision": "no", "sample_steps": 2, "gradient_checkpointing": False}


def test_imported_configs_validate_and_train_over_mcp(server_workspace, tmp_path, shapes):
    workspace = server_workspace
    source = tmp_path / "kohya"  # beside the workspace: an allowed folder
    source.mkdir()
    for file in DATA.glob("kohya_*"):
        (source / file.name).write_text(file.read_text())
    flux_data = tmp_path / "flux-shapes"
    for image in make_shape_dataset(flux_data, 2):
        image.with_suffix(".txt").write_text("[trigger], a flat shape")
    configs = workspace / "configs"

    async def call(session, tool: str, arguments: dict) -> dict:
        result = await session.call_tool(tool, arguments)
        assert not result.is_error, result.content
        return result.structured_content

    async def refused(session, arguments: dict, message: str) -> None:
        before = sorted(configs.glob("*")) if configs.exists() else []
        result = await session.call_tool("import-config", arguments)
        assert result.is_error and message in result.content[0].text, result.content
        assert (sorted(configs.glob("*")) if configs.exists() else []) == before

    async def script(session):
        kohya = await call(session, "import-config", {"name": "cat", "path": str(source / "kohya_lora.toml")})
        assert kohya["format"] == "kohya" and kohya["config"]["rank"] == 32
        reasons = {item["key"]: item["reason"] for item in kohya["unmapped"]}
        assert "xformers" in reasons and "outside the folders" in reasons["dataset_path"]
        assert kohya["config"]["dataset_path"] == "10_xyz_cat"  # the workspace dataset of that name
        assert "class_data_dir" in reasons and kohya["config"]["class_data_dir"] is None
        flux = await call(session, "import-config", {"name": "flux", "content": AI_TOOLKIT.read_text()})
        assert flux["format"] == "ai-toolkit" and "train.ema_config" in unmapped_keys(flux["unmapped"])

        await refused(session, {"name": "x", "content": "a = 1", "format": "onetrainer"}, "format")
        await refused(session, {"name": "x", "content": "a = [1,\n", "format": "kohya"}, "not valid TOML")
        await refused(session, {"name": "x", "content": "config: [\n", "format": "ai-toolkit"}, "not valid YAML")
        await refused(session, {"name": "x", "path": "/etc/hostname"}, "outside the folders")
        await refused(session, {"name": "cat", "content": AI_TOOLKIT.read_text()}, "already exists")
        await refused(session, {"name": "x"}, "content, or the file as path")

        changes = {
            "cat": {"model_name": "builtin:tiny-sd15", "dataset_path": str(shapes), "num_class_images": 1},
            "flux": {"model_name": "builtin:tiny-flux", "dataset_path": str(flux_data), "quantize_base": "none"},
        }
        for name, change in changes.items():
            await call(session, "update-training-config", {"name": name, "changes": FAST | change})
            report = await call(session, "validate-training-config", {"name": name})
            assert report["valid"], report["errors"]
            job = await call(session, "start-training", {"config_name": name})
            status = await wait_for_state(session, job["job_id"], ("completed", "failed"), timeout=400)
            assert status["state"] == "completed", status.get("error")
        samples = await session.call_tool("get-training-samples", {"job_id": job["job_id"]})
        texts = [item.text for item in samples.content if item.type == "text"]
        assert any("xyz_flux holding a sign" in text for text in texts), texts

    run_session(workspace, script)
