"""Every example config under examples/ loads, and the guide's values survive the trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import TrainingConfig
from training.sampling import control_prompt

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_FILES = sorted(EXAMPLES_DIR.rglob("*.yaml"))


def load_example(file_name: str) -> TrainingConfig:
    return TrainingConfig.load(EXAMPLES_DIR / file_name)


def test_there_are_examples():
    assert EXAMPLE_FILES, f"no *.yaml files found under {EXAMPLES_DIR}"


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.name for p in EXAMPLE_FILES])
def test_example_loads(path: Path):
    cfg = TrainingConfig.load(path)  # raises ConfigError on any problem
    assert cfg.name
    assert cfg.dataset_path


def test_advanced_example_kohya_names_win():
    cfg = load_example("advanced.yaml")
    assert cfg.rank == 32 and cfg.alpha == 32
    assert cfg.effective_rank == 32
    assert cfg.effective_alpha == 16
    assert any("network_alpha" in w for w in cfg.warnings())
    assert cfg.max_token_length == 225
    assert cfg.clip_skip == 2
    assert len(cfg.test_prompts) >= 2  # written as sample_prompts


@pytest.mark.parametrize("file_name", ["advanced.yaml", "quality-optimization.yaml"])
def test_the_guides_prior_preservation_without_a_class_validates_and_says_where_the_class_comes_from(file_name):
    cfg = load_example(file_name)
    assert cfg.prior_preservation and cfg.class_prompt is None and cfg.lora_type is None  # as the guide writes it
    assert any("the run takes it from the dataset's captions" in w for w in cfg.warnings())
    captions = ["xyz a woman in a red coat", "a woman, smiling", "portrait of a woman", "a street at night"]
    said = "class_prompt not set: using 'a photo of a woman': 3 of 4 captions name a woman; set class_prompt to choose"
    assert said in cfg.warnings(captions)
    assert cfg.resolve(native_resolution=64, num_images=4, captions=captions).class_prompt == "a photo of a woman"


def test_dreambooth_example_reads_prior_weight_alias():
    cfg = load_example("dreambooth.yaml")
    assert cfg.prior_preservation is True
    assert cfg.prior_loss_weight == 1.0
    # 1.0 is also the default, so check the alias was actually read, not defaulted
    assert "prior_loss_weight" in cfg.model_fields_set
    assert cfg.num_class_images == 200
    assert cfg.class_prompt == "person"
    assert cfg.instance_prompt == "xyz_person person"


def test_progressive_stage2_resumes_stage1():
    cfg = load_example("progressive-stage2.yaml")
    assert cfg.resume_from == "progressive-stage1"
    assert cfg.effective_rank == 32
    assert cfg.steps == 2000
    assert cfg.learning_rate == pytest.approx(0.0001)


def test_watched_example_sets_the_diagnostics_options():
    cfg = load_example("watched-style.yaml")
    assert cfg.lora_type == "style" and cfg.validation_split == 0.15 and cfg.validation_every == 100
    assert cfg.auto_stop_on == ["divergence", "no_effect"]
    assert control_prompt(cfg) == "painting of a sunset"


def test_the_flux_example_fits_its_family():
    cfg = load_example("flux.yaml")
    assert (cfg.quantize_base, cfg.mixed_precision, cfg.timestep_sampling) == ("8bit", "bf16", "shift")
    assert cfg.family_conflicts("flux") == ([], [])
    assert cfg.resolve(native_resolution=1024, num_images=15, family="flux").output_format == "diffusers"


def test_the_readme_configs_per_model_family_are_valid_configs():
    import json
    import re

    readme = (EXAMPLES_DIR.parent / "README.md").read_text()
    section = readme.split("## A config per model family", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```json\n(.*?)```", section, flags=re.DOTALL)
    configs = [TrainingConfig.from_dict(json.loads(block)) for block in blocks]
    assert [c.model_name for c in configs] == [
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "stabilityai/stable-diffusion-xl-base-1.0",
        "ostris/Flex.1-alpha",
    ]
    for config, family in zip(configs, ["sd1", "sdxl", "flux"]):
        assert config.family_conflicts(family) == ([], []), config.name  # nothing the family refuses or ignores


# --- every example trains as written ---------------------------------------------------------------

TORCHAO = EXAMPLES_DIR.parent / ".venv" / "extras" / "torchao"  # for the FLUX example's 8-bit base (the Makefile)
CAPTIONS = ["a woman in a red coat", "a woman, smiling", "portrait of a woman, soft light", "a woman at night"]


@pytest.fixture(scope="module")
def trained_examples(tmp_path_factory, workspace) -> dict[str, dict]:
    """Each example trained a few steps by the real Trainer with only model_name (the tiny model of its family)
    and dataset_path replaced, in one child process (tests/guide_examples.py says why), in file order, so the
    progressive stages resume from the stage before by name."""
    import json
    import os
    import subprocess
    import sys

    from PIL import Image

    dataset = tmp_path_factory.mktemp("guide-dataset")
    for number, caption in enumerate(CAPTIONS):  # captions that name a class, as a person's dataset would
        Image.new("RGB", (64, 64), (60 * number, 90, 200 - 40 * number)).save(dataset / f"{number}.png")
        (dataset / f"{number}.txt").write_text(caption)
    out = dataset.parent / "guide-examples.json"
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "guide_examples.py"), str(dataset), str(out)]
        + [str(path) for path in EXAMPLE_FILES],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES_DIR.parent), str(TORCHAO)])},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.name for p in EXAMPLE_FILES])
def test_every_example_trains_a_few_steps_as_written(trained_examples, path: Path):
    result = trained_examples[path.name]
    assert "error" not in result, result.get("error")
    assert result["state"] == "completed" and Path(result["lora"]).is_file()
    assert result["finite"] and result["lora_changed"], result["losses"]


def test_the_guides_advanced_config_trains_with_the_class_its_captions_name(trained_examples):
    result = trained_examples["advanced.yaml"]
    assert result["family"] == "flux" and result["class_prompt"] == "a photo of a woman"
    said = "class_prompt not set: using 'a photo of a woman': 4 of 4 captions"
    assert any(warning.startswith(said) for warning in result["warnings"])


def test_the_readme_configs_of_the_newer_families_are_the_example_files():
    """Each README config of SD 3.5, Chroma, Qwen-Image, Z-Image and FLUX.2 is an examples/ file as it stands (which the
    tests above load and train), and fits its family: nothing refused or ignored."""
    import re

    from training.families import guess_family

    readme = (EXAMPLES_DIR.parent / "README.md").read_text()
    section = readme.split("## SD 3.5, Chroma, Qwen-Image, Z-Image and FLUX.2", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)
    families = []
    for block in blocks:
        file_name = re.match(r"# lora-train examples/(\S+)", block).group(1)
        assert block == (EXAMPLES_DIR / file_name).read_text(), file_name
        config = load_example(file_name)
        family = guess_family(config.model_name, None).id
        assert config.family_conflicts(family) == ([], []), file_name
        families.append(family)
    assert families == ["sd3", "chroma", "qwen_image", "z_image", "flux2"]
