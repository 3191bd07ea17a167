"""TrainingConfig: the guide's defaults, resolve(), aliases, validation messages, YAML and warnings()."""

from __future__ import annotations

import pytest

from training.config import ConfigError, TrainingConfig


def make(**values) -> TrainingConfig:
    return TrainingConfig.from_dict({"name": "run", "dataset_path": "/data/set", **values})


def error_of(**values) -> str:
    with pytest.raises(ConfigError) as info:
        make(**values)
    return str(info.value)


# --- defaults -------------------------------------------------------------------------------


def test_defaults_follow_the_guide():
    cfg = make()
    assert cfg.learning_rate == pytest.approx(2e-4)
    assert cfg.rank == 32
    assert cfg.alpha is None
    assert cfg.effective_rank == 32
    assert cfg.effective_alpha == 32
    assert cfg.model_name == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.optimizer == "adamw"
    assert cfg.output_format is None and cfg.sample_guidance_scale is None  # by family, in resolve()
    assert cfg.resolution is None and cfg.steps is None  # filled in by resolve()


def test_effective_alpha_follows_an_explicit_rank_and_alpha():
    assert make(rank=8).effective_alpha == 8
    assert make(rank=8, alpha=4).effective_alpha == 4
    assert make(network_dim=16).effective_alpha == 16


# --- resolve() --------------------------------------------------------------------------------


def test_resolve_fills_steps_and_resolution():
    resolved = make().resolve(native_resolution=512, num_images=7)
    assert resolved.steps == 700
    assert resolved.resolution == 512
    assert resolved.rank == 32 and resolved.alpha == 32


def test_resolve_fills_the_familys_output_format_and_sample_guidance():
    sd = make().resolve(native_resolution=512, num_images=7)
    assert (sd.output_format, sd.sample_guidance_scale) == ("kohya", 7.5)
    flux = make().resolve(native_resolution=1024, num_images=7, family="flux")
    assert (flux.output_format, flux.sample_guidance_scale) == ("diffusers", 3.5)
    chosen = make(output_format="diffusers", sample_guidance_scale=2.0).resolve(native_resolution=512, num_images=7)
    assert (chosen.output_format, chosen.sample_guidance_scale) == ("diffusers", 2.0)


def test_options_that_do_not_fit_the_family_are_named():
    errors, warnings = make(train_text_encoder=True, clip_skip=2).family_conflicts("flux")
    assert len(errors) == 1 and "train the transformer only" in errors[0]
    assert warnings == ["clip_skip 2 has no effect on FLUX: its prompt states come from T5"]
    errors, warnings = make(timestep_sampling="uniform", quantize_base="8bit").family_conflicts("sdxl")
    assert len(errors) == 1 and errors[0].startswith("quantize_base 8bit is for FLUX")
    assert warnings == ["timestep_sampling is for flow-matching (FLUX) models; this sdxl model ignores it"]
    errors, warnings = make(max_token_length=150, clip_skip=2).family_conflicts("sdxl")
    assert errors == []
    assert warnings[0].startswith("clip_skip 2 has no effect on SDXL")
    assert make(train_text_encoder=True).family_conflicts("sd1") == ([], [])
    assert make(train_text_encoder=True).family_conflicts(None) == ([], [])


def test_resolve_keeps_explicit_values():
    resolved = make(steps=123, resolution=768, rank=8, alpha=4).resolve(native_resolution=512, num_images=7)
    assert resolved.steps == 123
    assert resolved.resolution == 768
    assert resolved.rank == 8 and resolved.alpha == 4


def test_resolve_with_no_images_still_has_a_step():
    assert make().resolve(native_resolution=64, num_images=0).steps == 1


def test_resolve_folds_kohya_names_into_rank_and_alpha():
    cfg = make(rank=8, alpha=4, network_dim=16, network_alpha=2)
    resolved = cfg.resolve(native_resolution=512, num_images=3)
    assert resolved.rank == 16
    assert resolved.alpha == 2
    assert resolved.network_dim is None
    assert resolved.network_alpha is None
    assert cfg.network_dim == 16  # the original is not changed
    # the folded config survives a YAML round trip as the same LoRA shape
    again = TrainingConfig.from_yaml(resolved.to_yaml())
    assert (again.effective_rank, again.effective_alpha) == (16, 2)


def test_warnings_name_both_values_when_kohya_names_differ():
    found = " | ".join(make(rank=8, alpha=4, network_dim=16, network_alpha=2).warnings())
    assert "rank=8" in found and "network_dim=16" in found
    assert "alpha=4" in found and "network_alpha=2" in found


def test_no_warning_when_only_kohya_names_are_given_or_they_agree():
    assert make(network_dim=16, network_alpha=8).warnings() == []
    assert make(rank=16, network_dim=16, alpha=8, network_alpha=8).warnings() == []


# --- aliases ----------------------------------------------------------------------------------


def test_aliases_fill_the_guide_names():
    cfg = make(sample_prompts=["xyz a cat"], prior_preservation_weight=0.5, lr=1e-4)
    assert cfg.test_prompts == ["xyz a cat"]
    assert cfg.prior_loss_weight == 0.5
    assert cfg.learning_rate == pytest.approx(1e-4)


def test_guide_names_work_directly():
    cfg = make(test_prompts=["p"], prior_loss_weight=2.0, learning_rate=5e-5)
    assert (cfg.test_prompts, cfg.prior_loss_weight, cfg.learning_rate) == (["p"], 2.0, 5e-5)


# --- invalid values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("resolution", 32, ["64", "4096"]),
        ("resolution", 4100, ["64", "4096"]),
        ("resolution", 100, ["multiple of 8"]),
        ("rank", 0, [">= 1", "1024"]),
        ("learning_rate", 0, ["> 0", "10"]),
        ("dropout", 1.0, ["< 1"]),
        ("caption_dropout_rate", 1.5, [">= 0", "<= 1"]),
        ("optimizer", "adam", ["adamw", "adamw8bit", "prodigy"]),
        ("lr_scheduler", "step", ["constant", "cosine"]),
        ("mixed_precision", "fp8", ["fp16", "bf16"]),
        ("max_token_length", 100, ["75", "150", "225"]),
        ("clip_skip", 0, [">= 1", "12"]),
    ],
)
def test_invalid_values_name_field_value_and_allowed_range(field, value, expected):
    msg = error_of(**{field: value})
    assert field in msg
    assert repr(value) in msg or str(value) in msg
    for part in expected:
        assert part in msg, f"{part!r} missing from {msg!r}"


def test_config_error_keeps_one_problem_per_field():
    with pytest.raises(ConfigError) as info:
        make(rank=0, clip_skip=0, optimizer="adam")
    problems = info.value.problems
    assert len(problems) == 3
    assert {p.split(" ")[0] for p in problems} == {"rank", "clip_skip", "optimizer"}


@pytest.mark.parametrize(("alias", "value", "bound"), [("lr", 0, "10"), ("prior_preservation_weight", 20, "10")])
def test_invalid_alias_value_also_names_the_allowed_range(alias, value, bound):
    msg = error_of(**{alias: value})
    assert alias in msg and str(value) in msg
    assert "allowed" in msg and bound in msg


@pytest.mark.parametrize("name", ["..", "a..b", "../escape", "a/b", "/abs", "", "-dash-first"])
def test_unsafe_names_are_rejected(name):
    msg = error_of(name=name)
    assert "name" in msg
    assert "'/'" in msg and "'..'" in msg


@pytest.mark.parametrize("name", ["run", "my-lora_v1.2", "A1"])
def test_safe_names_are_accepted(name):
    assert make(name=name).name == name


def test_unknown_option_is_named():
    msg = error_of(foo=1)
    assert "foo" in msg and "unknown option" in msg


@pytest.mark.parametrize("missing", ["name", "dataset_path"])
def test_required_fields(missing):
    values = {"name": "run", "dataset_path": "/data/set"}
    del values[missing]
    with pytest.raises(ConfigError) as info:
        TrainingConfig.from_dict(values)
    assert f"{missing} is required" in str(info.value)


def test_assignment_is_validated_too():
    cfg = make()
    with pytest.raises(ValueError):
        cfg.rank = 0
    assert cfg.rank == 32


# --- rules across fields ------------------------------------------------------------------------


def test_prior_preservation_needs_a_class_prompt_it_cannot_derive():
    msg = error_of(prior_preservation=True, lora_type="style")  # a style has no class to preserve
    assert "add class_prompt: 'a photo of a person'" in msg and "lora_type: person, character or object" in msg
    assert "prior_preservation to false" in msg
    cfg = make(prior_preservation=True, class_prompt="person")
    assert cfg.prior_preservation and cfg.class_prompt == "person" and cfg.warnings() == []


@pytest.mark.parametrize(
    ("values", "derived", "source"),
    [
        ({"lora_type": "character"}, "an illustration of a character", "lora_type character"),
        ({"lora_type": "person"}, "a photo of a person", "lora_type person"),
        (
            {"trigger_word": "xyz_style", "instance_prompt": "xyz_style painting"},
            "painting",
            "instance_prompt 'xyz_style painting' without the trigger word",
        ),
    ],
)
def test_prior_preservation_derives_its_class_prompt_and_says_so(values, derived, source):
    """The guide's Advanced config and Quality preset set prior_preservation without class_prompt."""
    cfg = make(prior_preservation=True, **values)
    assert cfg.class_prompt is None  # not written into the stored config: a later lora_type changes it
    assert f"class_prompt not set: using {derived!r} from {source}; set class_prompt to choose" in cfg.warnings()
    resolved = cfg.resolve(native_resolution=64, num_images=4)
    assert resolved.class_prompt == derived  # what the run generates its class images with
    assert make(**values).resolve(native_resolution=64, num_images=4).class_prompt is None  # no prior: no class


@pytest.mark.parametrize(
    ("captions", "derived"),
    [
        (["two women walking", "women at a cafe", "a street at night"], "a photo of a woman"),
        (["men in suits", "three men talking", "a man alone"], "a photo of a man"),
        (["children playing", "children at school", "a child reading"], "a photo of a child"),
        (["people on a beach", "a crowd of people"], "a photo of a person"),
    ],
)
def test_the_class_word_of_the_captions_is_found_in_its_irregular_plural(captions, derived):
    cfg = make(prior_preservation=True)
    assert cfg.resolve(native_resolution=64, num_images=3, captions=captions).class_prompt == derived


def test_random_crop_cannot_use_cached_latents():
    msg = error_of(crop="random", cache_latents=True)
    assert "random" in msg and "cache_latents" in msg
    assert "random" in error_of(crop="random")  # cache_latents defaults to true
    cfg = make(crop="random", cache_latents=False)
    assert cfg.crop == "random" and not cfg.cache_latents


def test_trigger_word_with_a_comma_is_rejected():
    msg = error_of(trigger_word="xyz, style")
    assert "trigger_word" in msg and "comma" in msg
    assert "trigger_word" in error_of(trigger_word="   ")
    assert make(trigger_word="  xyz_style ").trigger_word == "xyz_style"


def test_trigger_words_values_follow_the_trigger_word_rule():
    msg = error_of(trigger_words={"10_cat": "xyz, cat"})
    assert "trigger_words" in msg


@pytest.mark.parametrize("prompts", [[""], ["ok", ""], ["   "]])
def test_blank_test_prompts_are_rejected(prompts):
    msg = error_of(test_prompts=prompts)
    assert "test_prompts" in msg and "empty" in msg


# --- YAML ---------------------------------------------------------------------------------------


def test_yaml_round_trip_gives_an_equal_config():
    cfg = make(
        trigger_word="xyz_style",
        trigger_words={"10_cat": "sks_cat"},
        resolution=768,
        learning_rate=5e-5,
        alpha=16,
        test_prompts=["xyz_style a house", "xyz_style: a tree"],
        mixed_precision="no",
        lr_scheduler="cosine",
    )
    text = cfg.to_yaml()
    again = TrainingConfig.from_yaml(text)
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()
    assert "resolution: 768" in text
    assert "\nsteps:" not in text  # None values are left out


def test_yaml_round_trip_of_defaults_and_resolved_config():
    cfg = make()
    assert TrainingConfig.from_yaml(cfg.to_yaml()) == cfg
    resolved = cfg.resolve(native_resolution=512, num_images=3)
    assert TrainingConfig.from_yaml(resolved.to_yaml()) == resolved


def test_load_reads_a_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: from-file\ndataset_path: /d\nrank: 8\nsample_prompts: [a cat]\n", encoding="utf-8")
    cfg = TrainingConfig.load(path)
    assert (cfg.name, cfg.rank, cfg.test_prompts) == ("from-file", 8, ["a cat"])


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        TrainingConfig.load(path)
    msg = str(info.value)
    assert "cannot read" in msg and "nope.yaml" in msg
    assert "Traceback" not in msg


def test_load_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\ndataset_path: d\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        TrainingConfig.load(path)
    assert "not valid YAML" in str(info.value)


@pytest.mark.parametrize("text", ["- name: a\n- rank: 4\n", "just a string\n", ""])
def test_load_yaml_that_is_not_a_mapping(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        TrainingConfig.load(path)
    assert "mapping" in str(info.value)


def test_from_yaml_reports_field_problems():
    with pytest.raises(ConfigError) as info:
        TrainingConfig.from_yaml("name: run\ndataset_path: d\nrank: 0\n")
    assert "rank = 0" in str(info.value)


# --- warnings() -----------------------------------------------------------------------------------


def test_default_config_has_no_warnings():
    assert make().warnings() == []


def test_constant_scheduler_with_warmup_warns():
    found = make(lr_scheduler="constant", lr_warmup_steps=50).warnings()
    assert any("lr_warmup_steps" in w and "constant" in w for w in found)
    assert make(lr_scheduler="constant_with_warmup", lr_warmup_steps=50).warnings() == []


def test_disabled_sampling_with_prompts_warns():
    found = make(disable_sampling=True, test_prompts=["a cat"]).warnings()
    assert any("disable_sampling" in w and "test_prompts" in w for w in found)
    assert make(disable_sampling=True).warnings() == []
    assert make(test_prompts=["a cat"]).warnings() == []


def test_disk_cache_without_cache_warns():
    found = make(cache_latents=False, cache_latents_to_disk=True).warnings()
    assert any("cache_latents_to_disk" in w for w in found)
