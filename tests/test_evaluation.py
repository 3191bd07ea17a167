"""evaluate-lora's child (training/evaluation/): the arithmetic of its scores on the built-in tiny CLIP and
DINOv2 (random weights: the numbers mean nothing, but an image against itself scores 1 and fixed seeds repeat),
the verdicts over injected scores, and whole evaluations of LoRAs trained here, in process and as the job's
child."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fast_config
from PIL import Image

from training.data.synthetic import make_shape_dataset
from training.evaluation.report import EvaluationReport, StrengthScores, read_report
from training.evaluation.request import EvaluationJob, EvaluationRequest
from training.evaluation.run import evaluate, measure, prompts_of, strength_row
from training.evaluation.scoring import Scorer, likeness, mean_pairwise, paired_cosine
from training.diagnostics.evaluation_scores import COLLAPSE_DIVERSITY, PROMPT_SCORE_LOSS
from training.evaluation.verdicts import judge
from training.trainer import run_training

TINY = {"clip_model": "builtin:tiny-clip", "dino_model": "builtin:tiny-dinov2"}
TRIGGER = "xyz_shape"


@pytest.fixture(scope="module")
def scorer(workspace) -> Scorer:
    return Scorer(TINY["clip_model"], TINY["dino_model"], torch.device("cpu"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd15) -> tuple[Path, Path, Path]:
    """A dataset and two LoRAs trained on it at a high rate (so that they move the image): one run's final LoRA
    (step 3) and its checkpoint's at step 2, a step less trained."""
    root = tmp_path_factory.mktemp("evaluation")
    data = root / "shapes"
    make_shape_dataset(data, 4, trigger_word=TRIGGER)
    a = run_training(fast_config(data, name="a", steps=3, learning_rate=5e-2, save_every=2), root / "a")
    assert a.state == "completed"
    [b] = (root / "a" / "checkpoints" / "step000002").glob("*.safetensors")
    return data, a.lora_path, b


def job(tmp_path: Path, data: Path, lora: Path, **overrides) -> EvaluationJob:
    tmp_path.mkdir(parents=True, exist_ok=True)  # the run folder the report goes into exists, as a job's does
    values = dict(
        lora=str(lora),
        model_name="builtin:tiny-sd15",
        prompts=[f"{TRIGGER} a red circle"],
        trigger_word=TRIGGER,
        training_images=str(data),
        output_dir=str(tmp_path),
        seeds=[1, 2],
        strengths=[1.0],
        steps=2,
        **TINY,
    )
    return EvaluationJob(**{**values, **overrides})


def test_the_request_names_one_lora_and_always_evaluates_the_base():
    assert EvaluationRequest(job_id="run-1").strengths == [0.0, 0.5, 0.75, 1.0]
    assert EvaluationRequest(lora="mine", strengths=[1, 0.6]).strengths == [0.0, 0.6, 1.0]
    both, step_without_job = {"job_id": "r", "lora": "l"}, {"lora": "l", "step": 100}
    for wrong in ({}, both, step_without_job, {"job_id": "r", "seeds": [1]}):
        with pytest.raises(ValueError):
            EvaluationRequest(**wrong)
    with pytest.raises(ValueError, match="between -2 and 2"):
        EvaluationRequest(job_id="run-1", strengths=[3.0])


def test_prompts_get_the_trigger_word_first_and_lose_it_for_clip(tmp_path):
    prompts = prompts_of(job(tmp_path, tmp_path, tmp_path, prompts=[f"{TRIGGER} a red circle", "a blue square"]))
    assert [(p.with_trigger, p.without_trigger, p.text) for p in prompts] == [
        (f"{TRIGGER} a red circle", "a red circle", "a red circle"),
        (f"{TRIGGER}, a blue square", "a blue square", "a blue square"),
    ]
    no_trigger = prompts_of(job(tmp_path, tmp_path, tmp_path, trigger_word=None, prompts=["a blue square"]))
    assert [(p.with_trigger, p.without_trigger) for p in no_trigger] == [("a blue square", None)]


def test_the_cosine_arithmetic():
    rows = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    assert paired_cosine(rows, rows).tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert mean_pairwise(rows) == pytest.approx((0.6 + 0.0 + 0.8) / 3)
    assert mean_pairwise(rows[[0, 0]]) == pytest.approx(1.0)  # identical images: total collapse
    found = likeness(rows[[0]], rows[1:])  # [1, 0] against [0.6, 0.8] and [0, 1]
    assert (found.mean, found.max, found.nearest) == pytest.approx((0.6, 0.6, 0))


def test_an_image_against_itself_scores_1(tmp_path, scorer):
    data = tmp_path / "shapes"
    [first, second, *_] = make_shape_dataset(data, 4, trigger_word=TRIGGER)
    copy = Image.open(second).convert("RGB")
    for model in (scorer.clip_images, scorer.dino_images):
        embeddings = model([copy, copy, Image.open(first)])
        assert paired_cosine(embeddings[0], embeddings[1]).item() == pytest.approx(1.0, abs=1e-5)
        assert paired_cosine(embeddings[0], embeddings[2]).item() < 0.9999
    # Renders that are a training image, under two seeds: a perfect copy, with no diversity.
    prompts = prompts_of(job(tmp_path, data, tmp_path, trigger_word=None, prompts=["a red circle"]))
    images = {(0.0, "with", 0, 0): copy, (0.0, "with", 0, 1): copy}
    row = strength_row(measure(scorer, images, prompts, str(data)), 0.0)
    assert row.likeness_dino_max == row.likeness_dino_mean == row.likeness_clip_max == 1.0
    assert row.nearest_training_image == second.name
    assert row.diversity == 1.0
    assert row.prompt_score_without_trigger is None and row.control_shift is None


def scores(strength: float, likeness: float, prompt: float = 0.3, diversity: float = 0.7, **more) -> StrengthScores:
    return StrengthScores(
        strength=strength, prompt_score=prompt, likeness_dino_mean=likeness, diversity=diversity, **more
    )


def test_the_best_strength_is_the_lowest_near_the_top_likeness_that_keeps_the_prompt():
    base = scores(0.0, 0.42)
    best, verdicts = judge([base, scores(0.5, 0.6), scores(0.75, 0.70), scores(1.0, 0.71, prompt=0.24)])
    # 1.0 loses the prompt (0.24: 20% under the base's 0.3); of the rest 0.75 reaches 90% of the top gain (0.28),
    # 0.5 does not
    assert best == 0.75
    assert verdicts[0] == (
        "best strength about 0.75: likeness 0.70 vs base 0.42 (DINOv2), prompt score 0.30 vs base 0.30"
    )
    assert verdicts[1].startswith(f"prompt score drops below {(1 - PROMPT_SCORE_LOSS) * 0.3:.2f}")
    assert "from strength 1: 0.24" in verdicts[1]


def test_no_effect_collapse_and_bleeding_are_named():
    best, verdicts = judge([scores(0.0, 0.42), scores(1.0, 0.43, diversity=0.99, control_shift=0.4)])
    assert best is None
    assert verdicts[0].startswith("no effect: likeness at most 0.43 (strength 1) vs base 0.42")
    assert any(v.endswith("style bleeding") for v in verdicts)
    assert any(v.endswith("(collapse)") for v in verdicts) and 0.99 > COLLAPSE_DIVERSITY
    best, verdicts = judge([scores(0.0, None, prompt=-0.1), scores(1.0, None, prompt=-0.3, control_shift=0.01)])
    assert best is None and verdicts[0].startswith("likeness not measured")
    assert verdicts[1] == "prompt following not judged: CLIP scores the base model's images -0.10 for the prompts"
    assert any(v.endswith("no bleeding") for v in verdicts)


def test_the_copy_verdict_needs_collapsed_seeds_as_the_copying_rule_does():
    near_duplicate = {"likeness_dino_max": 0.97, "nearest_training_image": "2.png"}
    _, verdicts = judge([scores(0.0, 0.42), scores(1.0, 0.6, **near_duplicate)])  # the seeds still vary (0.7)
    assert not any("nearly copies" in verdict for verdict in verdicts)
    _, verdicts = judge([scores(0.0, 0.42), scores(1.0, 0.6, diversity=0.95, **near_duplicate)])
    copied = "from strength 1 a render nearly copies training image 2.png (DINOv2 0.97) and the seeds' renders are "
    assert copied + "alike (diversity 0.95)" in verdicts


def test_an_evaluation_measures_every_strength_and_repeats_exactly(tmp_path, trained):
    data, a, b = trained
    report = evaluate(job(tmp_path / "a", data, a, step=3, job_id="run-a"))
    assert report == read_report(tmp_path / "a", step=3)
    assert [row.strength for row in report.rows] == [0.0, 1.0]
    assert report.control_prompt == "a red circle"
    base, full = report.rows
    assert base.control_shift == 0.0  # the control prompt's base render against itself
    assert full.control_shift != 0.0  # the LoRA moves it (trained at a high rate)
    for row in report.rows:
        assert -1.0 <= row.prompt_score <= 1.0 and row.prompt_score_without_trigger is not None
        assert row.likeness_dino_mean <= row.likeness_dino_max <= 1.0
        assert row.likeness_clip_mean <= row.likeness_clip_max <= 1.0
        assert row.nearest_training_image in {path.name for path in data.glob("*.png")}
    with Image.open(tmp_path / "a" / report.grid) as grid:
        assert re.fullmatch(r"evaluation-grid-step3-[0-9a-f]{8}\.jpg", report.grid)
        assert grid.size == (2 * 192, 2 * (192 + 20))  # prompt and control; strengths 0 and 1
    # Strength 0 is the base model whichever LoRA is loaded: the fixed seeds give it the same numbers in a second
    # evaluation. That one (the checkpoint's LoRA, reported as the same step here) replaces the report, and the
    # grid the old report named goes only with it: each report names a grid of its own.
    other = evaluate(job(tmp_path / "a", data, b, step=3, job_id="run-a"))
    assert other.rows[0] == report.rows[0]
    assert other.rows[1] != report.rows[1]
    assert other.grid != report.grid and read_report(tmp_path / "a", step=3) == other
    assert sorted(path.name for path in (tmp_path / "a").iterdir()) == sorted(["evaluation-step3.json", other.grid])


def test_the_job_child_writes_its_report_and_status(tmp_path, trained):
    data, a, _ = trained
    run_dir, output = tmp_path / "job", tmp_path / "training-run"
    run_dir.mkdir()
    request = job(output, data, a, job_id="run-a", strengths=[0.0, 1.0], prompts=["a red circle"])
    (run_dir / "request.json").write_text(request.model_dump_json(), encoding="utf-8")
    # The child imports this tree's code, wherever the installed package points.
    paths = [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run([sys.executable, "-m", "training.evaluation.run", str(run_dir)], env=env, timeout=600)
    status = json.loads((run_dir / "status.json").read_text())
    assert done.returncode == 0, (run_dir / "train.log").read_text()
    assert status["state"] == "completed"
    renders = 2 * (2 * 2 + 2)  # strengths x (seeds x with/without the trigger + the control's seeds)
    assert status["step"] == status["total_steps"] == renders
    report = EvaluationReport.model_validate_json((output / "evaluation.json").read_text())
    assert status["evaluation"] == str(output / "evaluation.json") and status["verdicts"] == report.verdicts
    assert report.prompts == [f"{TRIGGER}, a red circle"] and report.job_id == "run-a"
    assert [row.strength for row in report.rows] == [0.0, 1.0] and report.verdicts


def test_a_trigger_word_that_hardly_matters_is_named():
    base = scores(0.0, 0.42)
    _, verdicts = judge([base, scores(1.0, 0.60, likeness_without_trigger_dino_mean=0.58)])
    hardly = "trigger word: likeness at strength 1 0.60 with it, 0.58 without (base 0.42): it hardly matters"
    assert hardly in "\n".join(verdicts)
    _, verdicts = judge([base, scores(1.0, 0.60, likeness_without_trigger_dino_mean=0.45)])
    assert "trigger word: likeness at strength 1 0.60 with it, 0.45 without (base 0.42)" in verdicts
