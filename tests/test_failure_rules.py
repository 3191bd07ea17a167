"""The reported failures (issue 17 item 3): broken samples, sampling past sample_timeout_s, a loss that collapses
early, and a resume whose LoRA shape, model or dataset changed. Each rule as a function over injected records,
then end to end: a tiny run whose trainer injects the fault shows the symptom and the finding, and a healthy
run shows neither."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import fast_config
from test_training_rules import config, decaying, fire, flat, healthy, rows

from training.data.synthetic import make_shape_dataset
from training.diagnostics.evidence import RunEvidence, SampleRow, SampleTimeoutRow
from training.diagnostics.failure_rules import (
    FAILURE_RULES,
    NEAR_ZERO_LOSS,
    broken_samples,
    loss_collapsed_early,
    sampling_timeout,
)
from training.diagnostics.rules import training_findings
from training.config import TrainingConfig
from training.resume_source import resume_conflicts
from training.trainer import Trainer, run_training


def sample(step: int, index: int, *, mean=0.45, contrast=0.2, non_finite=False) -> SampleRow:
    return SampleRow(
        step=step,
        prompt_index=index,
        prompt="xyz a photo",
        file=f"step{step:06d}_p{index}.png",
        mean=mean,
        contrast=contrast,
        non_finite=non_finite,
    )


def sampled(*broken_at: int, steps=(0, 100, 200), **kind) -> list[SampleRow]:
    """Two samples per step; the first one broken (as `kind` says) at the steps in `broken_at`."""
    return [sample(s, i, **(kind if s in broken_at and i == 0 else {})) for s in steps for i in range(2)]


# --- the rules over injected records ----------------------------------------------------------------------------
@pytest.mark.parametrize("rule", FAILURE_RULES)
def test_healthy_and_empty_runs_raise_nothing(rule):
    assert rule(healthy(samples=sampled())) is None
    assert rule(RunEvidence(config=config())) is None


@pytest.mark.parametrize(
    "kind, word",
    [({"non_finite": True, "mean": 0.0}, "non-finite"), ({"mean": 0.005}, "black"), ({"contrast": 0.002}, "flat")],
)
def test_broken_samples_under_fp16_patch_bf16(kind, word):
    evidence = healthy(config=config(mixed_precision="fp16"), samples=sampled(100, 200, **kind))
    finding = fire(broken_samples, evidence)
    assert finding.patch == {"mixed_precision": "bf16"}
    assert f"1 of the 2 samples at step 200 are {word}" in finding.message
    assert "first seen at step 100" in finding.message
    assert finding.evidence["broken"] == {"step000200_p0.png": word}


def test_broken_samples_under_fp16_on_a_card_without_bf16_patch_fp32():
    """A T4 or a GeForce 10xx/20xx (status.json's bf16_native false): bf16 would be emulated, so fp32 is the fix."""
    evidence = healthy(config=config(mixed_precision="fp16"), samples=sampled(0, 100, 200, mean=0.0))
    assert fire(broken_samples, evidence.model_copy(update={"bf16_native": False})).patch == {"mixed_precision": "no"}
    assert fire(broken_samples, evidence.model_copy(update={"bf16_native": True})).patch == {"mixed_precision": "bf16"}


def test_broken_samples_name_the_cause_by_when_they_broke():
    in_bf16 = fire(broken_samples, healthy(config=config(mixed_precision="bf16"), samples=sampled(0, 200, mean=0.0)))
    assert in_bf16.patch == {"mixed_precision": "no"} and "decoding in bf16 before any training" in in_bf16.message
    from_the_start = fire(broken_samples, healthy(samples=sampled(0, 100, 200, mean=0.0)))
    assert from_the_start.patch == {} and "before any training, in fp32" in from_the_start.message  # the files
    later = fire(broken_samples, healthy(config=config(mixed_precision="bf16"), samples=sampled(200, mean=0.0)))
    assert later.patch == {"learning_rate": 1e-4} and "blown up" in later.message  # the default 2e-4 halved
    assert broken_samples(healthy(samples=sampled(100, mean=0.0))) is None  # broken once, fine at the latest step


def test_sampling_timeouts_patch_fewer_denoising_steps_then_more_time():
    timeout = SampleTimeoutRow(step=500, seconds=905.2, limit=900, rendered=2, prompts=5)
    finding = fire(sampling_timeout, healthy(sample_timeouts=[timeout]))
    assert finding.patch == {"sample_steps": 10}  # the default 20 halved
    assert "step 500, 2 of 5 images after 905 s" in finding.message
    floor = fire(sampling_timeout, healthy(config=config(sample_steps=10), sample_timeouts=[timeout]))
    assert floor.patch == {"sample_timeout_s": 1800}  # twice the limit


def test_loss_near_zero_in_the_first_tenth_is_memorising():
    losses = decaying(30, start=0.3, floor=0.001, tau=3, noise=0.1)  # under 0.01 from about step 12
    finding = fire(loss_collapsed_early, healthy(config=config(steps=300, dropout=0.0), train=rows(losses)))
    assert finding.evidence["step"] <= 30 and finding.evidence["loss"] < NEAR_ZERO_LOSS
    assert finding.patch == {"learning_rate": 1e-4, "dropout": 0.2}
    assert "loss-collapsed-early" in [f.rule for f in training_findings(healthy(train=rows(losses)))]
    # the same fall after the first tenth of a 100-step run, and a healthy flat run, are not memorising
    assert loss_collapsed_early(healthy(config=config(steps=100), train=rows([0.1] * 20 + losses))) is None
    assert loss_collapsed_early(healthy(config=config(steps=100), train=rows(flat(100, 0.1, noise=1.0)))) is None


def test_a_single_near_zero_step_is_not_a_collapse():
    losses = flat(40, 0.1, noise=0.2)
    losses[5] = losses[6] = 1e-4  # two steps drawn at very high noise levels
    assert loss_collapsed_early(healthy(config=config(steps=400), train=rows(losses))) is None


def test_run_evidence_reads_timeouts_and_non_finite_samples(tmp_path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "config.yaml").write_text(config().to_yaml())
    timeout = {"kind": "sample_timeout", "step": 4, "seconds": 1.5, "limit": 1.0, "rendered": 0, "prompts": 2}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(timeout) + "\n")
    row = sample(4, 0, mean=0.0, non_finite=True).model_dump()
    (tmp_path / "samples" / "index.jsonl").write_text(json.dumps(row) + "\n")
    evidence = RunEvidence.from_run_dir(tmp_path)
    assert evidence.sample_timeouts == [SampleTimeoutRow(step=4, seconds=1.5, limit=1.0, rendered=0, prompts=2)]
    assert evidence.samples[0].non_finite and evidence.train == []


def test_resume_conflicts_name_each_difference(tmp_path):
    saved = tmp_path / "checkpoints" / "step000200"
    saved.mkdir(parents=True)
    (saved / "config.yaml").write_text(config(rank=16, alpha=16, model_name="a").to_yaml())
    assert resume_conflicts(config(rank=16, alpha=16, model_name="a", steps=2000), tmp_path) == []  # steps may grow
    changed = resume_conflicts(config(rank=32, alpha=16, model_name="b", dataset_path="e"), tmp_path)
    assert [line.split(" ")[0] for line in changed] == ["rank", "model_name", "dataset_path"]
    assert changed[0].startswith("rank is 32 but checkpoint step000200 was trained with 16")
    assert f"resume_from: {saved}" in changed[0]
    assert resume_conflicts(config(rank=32), tmp_path / "elsewhere") == []  # no checkpoint: nothing to continue


# --- end to end on the tiny model -------------------------------------------------------------------------------
PLANNED = 150  # the runs below plan 150 steps ...
STOP_AT = 18  # ... and stop here: past the first tenth (step 15), which is all the memorising rule reads
SAMPLE_EVERY = 6  # samples at steps 0, 6, 12 and 18


class _StopsEarly(Trainer):
    """A run of PLANNED steps that stops after STOP_AT (as stop-training would)."""

    def _optimizer_step(self):
        if self.step == STOP_AT - 1:
            self.request_stop()  # carried by this step's all-reduce: the run stops after it
        return super()._optimizer_step()


class _Faults(_StopsEarly):
    """Three faults at once: from step 6 the VAE decodes to infinity (as an fp16 VAE overflows; the latents are
    cached, so training never uses it again), the round of samples at step 12 runs past its time limit, and from
    step 4 the loss is near zero (a model that has memorised its images: steps 4-13 are a window of 10 within the
    first tenth)."""

    def _render_samples(self):
        if self.step >= 6:
            with torch.no_grad():
                self.base.vae.post_quant_conv.bias.fill_(float("inf"))
        limit = 1e-9 if self.step == 12 else self.config.sample_timeout_s  # any denoising step takes longer
        self.config = self.config.model_copy(update={"sample_timeout_s": limit})
        super()._render_samples()
        self.config = self.config.model_copy(update={"sample_timeout_s": 900.0})

    def _loss(self, batch):
        loss = super()._loss(batch)
        return loss * 1e-4 if self.step >= 3 else loss


def sampled_run(trainer_class, tmp_path: Path, dataset: Path):
    run_config = fast_config(
        dataset,
        steps=PLANNED,
        disable_sampling=False,
        test_prompts=["xyz_shape a red circle"],
        sample_every=SAMPLE_EVERY,
        sample_steps=2,
        mixed_precision="fp16",
    )
    trainer = trainer_class(run_config, tmp_path / "run")
    with_result = trainer.cleanup(_run(trainer))
    return with_result, RunEvidence.from_run_dir(tmp_path / "run")


def _run(trainer: Trainer):
    trainer.setup()
    trainer.train()
    return trainer.finish()


def test_a_healthy_tiny_run_trips_no_failure_rule(tmp_path, shapes):
    result, evidence = sampled_run(_StopsEarly, tmp_path, shapes)
    assert result.state == "stopped" and result.step == STOP_AT
    assert [row.step for row in evidence.samples] == [0, 0, 6, 6, 12, 12, 18, 18]  # the prompt and the control
    assert not any(row.non_finite for row in evidence.samples) and evidence.sample_timeouts == []
    assert [rule(evidence) for rule in FAILURE_RULES] == [None, None, None], [s.model_dump() for s in evidence.samples]
    assert json.loads((tmp_path / "run" / "status.json").read_text()).get("warnings", []) == []


def test_injected_faults_are_recorded_and_named(tmp_path, shapes):
    result, evidence = sampled_run(_Faults, tmp_path, shapes)
    assert result.state == "stopped" and result.step == STOP_AT  # training went on past the abandoned samples
    run = tmp_path / "run"
    rendered = [(row.step, row.non_finite) for row in evidence.samples if row.prompt_index == 0]
    assert rendered == [(0, False), (6, True), (18, True)]
    assert [(t.step, t.rendered, t.prompts) for t in evidence.sample_timeouts] == [(12, 0, 2)]
    warnings = json.loads((run / "status.json").read_text())["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("sampling at step 12 abandoned")
    assert "sampling at step 12 abandoned" in (run / "train.log").read_text()

    found = {finding.rule: finding for finding in training_findings(evidence)}
    assert evidence.bf16_native is False  # this CPU: bf16 is emulated, 15-20x slower than fp32
    assert found["broken-samples"].patch == {"mixed_precision": "no"}
    assert found["sampling-timeout"].patch == {"sample_timeout_s": 2e-9}  # sample_steps 2 is under the floor
    assert found["loss-collapsed-early"].evidence["step"] <= PLANNED // 10


@pytest.fixture
def checkpointed_run(tmp_path, shapes) -> Path:
    """A finished 4-step run with a checkpoint at step 2."""
    result = run_training(fast_config(shapes, steps=4, save_every=2), tmp_path / "run")
    assert result.state == "completed", result.error
    return tmp_path / "run"


def test_a_resume_with_another_rank_or_dataset_is_refused_resume_from_grows_it(tmp_path, shapes, checkpointed_run):
    config_file = checkpointed_run / "config.yaml"
    saved = config_file.read_text()
    resolved = TrainingConfig.load(config_file)  # what lora-train --resume and resume-training continue with
    grown = run_training(resolved.model_copy(update={"rank": 8}), checkpointed_run, resume=True)
    assert grown.state == "failed" and "rank is 8 but checkpoint step000002 was trained with 4" in grown.error
    assert config_file.read_text() == saved  # refused before anything was rewritten

    make_shape_dataset(tmp_path / "more", 5, trigger_word="xyz_shape")
    for name in ("shape_004.png", "shape_004.txt"):
        shutil.copy(tmp_path / "more" / name, shapes)
    more = run_training(resolved, checkpointed_run, resume=True)
    assert more.state == "failed", more.error
    assert "now has 5 training images but checkpoint step000002 was trained on 4" in more.error

    start_from = fast_config(shapes, steps=1, rank=8, resume_from=str(checkpointed_run / "checkpoints" / "step000002"))
    assert run_training(start_from, tmp_path / "new").state == "completed"  # a new run may grow the rank
