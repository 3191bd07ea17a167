"""Pre-flight diagnostic rules, each on its own."""

from __future__ import annotations

from training.config import TrainingConfig
from training.diagnostics.preflight import (
    alpha_above_rank,
    generic_trigger_word,
    learning_rate_band,
    preflight_findings,
    steps_vs_images,
)


def config(**values) -> TrainingConfig:
    return TrainingConfig.from_dict({"name": "c", "dataset_path": "d", **values})


def test_steps_far_from_100_per_image():
    assert steps_vs_images(config(steps=2000), 20) is None
    finding = steps_vs_images(config(steps=100), 20)
    assert finding.rule == "steps-vs-images" and finding.patch == {"steps": 2000}
    assert "underfitting" in finding.message
    assert "overfitting" in steps_vs_images(config(steps=20000), 20).message
    assert steps_vs_images(config(), 20) is None  # steps unset: the default is 100 x images


def test_learning_rate_bands():
    assert learning_rate_band(config(), None) is None
    high = learning_rate_band(config(learning_rate=1e-2), None)
    assert high.patch == {"learning_rate": 2e-4} and "oscillate" in high.message
    assert "barely move" in learning_rate_band(config(learning_rate=1e-6), None).message
    prodigy = learning_rate_band(config(optimizer="prodigy"), None)
    assert prodigy.patch == {"learning_rate": 1.0}
    assert learning_rate_band(config(optimizer="prodigy", learning_rate=1.0), None) is None


def test_alpha_above_rank():
    assert alpha_above_rank(config(rank=16, alpha=16), None) is None
    assert alpha_above_rank(config(rank=64, alpha=32), None) is None
    finding = alpha_above_rank(config(rank=16, alpha=32), None)
    assert finding.evidence == {"rank": 16, "alpha": 32.0} and finding.patch == {"alpha": 16.0}


def test_generic_trigger_words():
    assert generic_trigger_word(config(trigger_word="xyz_style"), None) is None
    finding = generic_trigger_word(config(trigger_word="style"), None)
    assert finding.patch == {"trigger_word": "xyz_style"}
    assert generic_trigger_word(config(trigger_words={"dogs": "dog"}), None).patch == {}


def test_preflight_collects_every_rule():
    findings = preflight_findings(config(steps=10, learning_rate=1e-2, rank=8, alpha=16, trigger_word="person"), 10)
    assert {f.rule for f in findings} == {
        "steps-vs-images",
        "learning-rate",
        "alpha-above-rank",
        "generic-trigger-word",
    }
    assert all(f.line().startswith(f"[{f.rule}]") for f in findings)
