"""The evaluation child: `python -m training.evaluation.run RUN_DIR` reads RUN_DIR/request.json (an
EvaluationJob), renders its prompts at each strength over fixed seeds, with and without the trigger word,
and the control prompt, through the renderer generate-image and compare-lora-strengths use
(training/generation.py), scores the images (scoring.py) and writes the report and a labelled grid into the
evaluated training run's folder (`output_dir`), with status.json and train.log in RUN_DIR as it works."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from training.data.captions import fill_trigger, without_trigger
from training.data.dataset import CLASS_FOLDER, VALIDATION_FOLDER, image_files
from training.evaluation.report import EvaluationReport, StrengthScores, grid_name, read_report, report_name
from training.evaluation.request import EvaluationJob
from training.evaluation.scoring import Likeness, Scorer, likeness, mean_pairwise, paired_cosine
from training.evaluation.verdicts import judge
from training.generation import GRID_LABEL_HEIGHT, LoraStrength, Renderer, lora_weights
from training.image_files import upright_image
from training.workspace import atomic_output, atomic_write_json

log = logging.getLogger("training.evaluation")
# Training images scored against, spread evenly over the set: likeness is a best match, which 256 images
# find as well as thousands, at a bounded embedding cost (seconds on a GPU, about a minute on a CPU).
MAX_TRAINING_IMAGES = 256
TRAINING_IMAGE_SIDE = 512  # px: training images are shrunk to this before scoring
# px a side of a grid thumbnail: at most 9 rows (8 strengths and the base) x 9 columns (8 prompts and the
# control), 1728 x 1908 px, stay under ~1 MB of JPEG
GRID_CELL = 192
DIGITS = 4  # scores are rounded to this many decimals: the 5th is below the noise of any of them


@dataclass(frozen=True)
class Prompt:
    with_trigger: str
    without_trigger: str | None  # None: there is no trigger word to take out
    text: str  # what CLIP scores the images against: the prompt without the trigger, which CLIP cannot read


def prompts_of(job: EvaluationJob) -> list[Prompt]:
    """Each prompt with the trigger word (put first where it lacks it) and without it."""
    trigger = job.trigger_word
    prompts = []
    for prompt in (fill_trigger(prompt, trigger) for prompt in job.prompts):
        stripped = without_trigger(prompt, [trigger]) if trigger else None
        if trigger and stripped is None and prompt.strip() != trigger:  # the trigger is not in it
            prompts.append(Prompt(f"{trigger}, {prompt}", prompt, prompt))
        else:
            prompts.append(Prompt(prompt, stripped, stripped or prompt))
    return prompts


def control_of(job: EvaluationJob, prompts: list[Prompt]) -> str | None:
    """The control prompt: the training run's, else the first prompt without its trigger (as samples do)."""
    return job.control_prompt or prompts[0].without_trigger


# An image's key: (strength, kind, prompt index, seed index); kind "with" / "without" (the trigger) / "control".
Key = tuple[float, str, int, int]


def render_plan(job: EvaluationJob, prompts: list[Prompt], control: str | None) -> list[tuple[Key, str]]:
    plan = []
    for strength in job.strengths:
        for index, prompt in enumerate(prompts):
            for seed in range(len(job.seeds)):
                plan.append(((strength, "with", index, seed), prompt.with_trigger))
                if prompt.without_trigger is not None:
                    plan.append(((strength, "without", index, seed), prompt.without_trigger))
        if control is not None:
            plan.extend(((strength, "control", 0, seed), control) for seed in range(len(job.seeds)))
    return plan


def render_all(
    job: EvaluationJob,
    plan: list[tuple[Key, str]],
    on_image: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
) -> dict | None:
    """The plan's images by key, None when stopped first."""
    lora = LoraStrength(lora=job.lora)
    renderer = Renderer(job.model_name, [lora])
    images = {}
    for index, (key, prompt) in enumerate(plan):
        if stop is not None and stop.is_set():
            return None
        strength, _, _, seed = key
        images[key] = renderer.render(
            prompt,
            [lora_weights(lora, strength)],
            job.seeds[seed],
            steps=job.steps,
            guidance=job.guidance,
            width=job.resolution,
            height=job.resolution,
        )
        if on_image:
            on_image(index + 1, len(plan))
    return images


def training_images(folder: str | None) -> list[Path]:
    """The images the LoRA was trained on (not the held-out 'validation' or the 'class' folder), at most
    MAX_TRAINING_IMAGES spread evenly; relative to `folder`."""
    if folder is None or not Path(folder).is_dir():
        return []
    root = Path(folder)
    found = [
        path.relative_to(root)
        for path in image_files(root, recursive=True)
        if path.relative_to(root).parts[0] not in (VALIDATION_FOLDER, CLASS_FOLDER)
    ]
    step = max(1, -(-len(found) // MAX_TRAINING_IMAGES))
    return found[::step]


@dataclass
class Measured:
    """The embeddings everything is scored from: the renders' (rows by key), the prompts' CLIP text
    embeddings, and the training images' (none when there are no training images)."""

    keys: dict  # key -> row of clip and dino
    clip: torch.Tensor
    dino: torch.Tensor
    texts: torch.Tensor  # a row per prompt
    training_names: list[Path]
    training_clip: torch.Tensor | None
    training_dino: torch.Tensor | None

    def of(self, keys: list[Key], model: str) -> torch.Tensor:
        return getattr(self, model)[[self.keys[key] for key in keys]]

    def rendered(self, strength: float, kind: str) -> list[Key]:
        return [key for key in self.keys if key[0] == strength and key[1] == kind]

    def prompt_score(self, keys: list[Key]) -> float | None:
        """Mean CLIP cosine of the images with their prompts' texts."""
        if not keys:
            return None
        return float(paired_cosine(self.of(keys, "clip"), self.texts[[key[2] for key in keys]]).mean())

    def likeness(self, keys: list[Key], model: str) -> Likeness | None:
        references = self.training_clip if model == "clip" else self.training_dino
        return likeness(self.of(keys, model), references) if keys and self.training_names else None

    def control_shift(self, strength: float) -> float | None:
        """1 - mean DINOv2 cosine of the control prompt's renders at `strength` and at 0, seed by seed."""
        keys = self.rendered(strength, "control")
        if not keys:
            return None
        base = [(0.0, "control", 0, key[3]) for key in keys]
        return 1.0 - float(paired_cosine(self.of(keys, "dino"), self.of(base, "dino")).mean())

    def diversity(self, strength: float) -> float:
        """Mean pairwise DINOv2 cosine among the seeds' renders of each prompt, averaged over the prompts."""
        keys = self.rendered(strength, "with")
        prompts = sorted({key[2] for key in keys})
        return sum(mean_pairwise(self.of([k for k in keys if k[2] == p], "dino")) for p in prompts) / len(prompts)


def measure(scorer: Scorer, images: dict, prompts: list[Prompt], training_folder: str | None) -> Measured:
    keys = list(images)
    pictures = [images[key] for key in keys]
    names = training_images(training_folder)
    training = []
    for name in names:
        with upright_image(Path(training_folder) / name) as image:
            picture = image.convert("RGB")
        # The scorers see 224-256 px; 512 px keeps that detail while 256 photos take ~200 MB, not gigabytes.
        picture.thumbnail((TRAINING_IMAGE_SIDE, TRAINING_IMAGE_SIDE))
        training.append(picture)
    return Measured(
        keys={key: row for row, key in enumerate(keys)},
        clip=scorer.clip_images(pictures),
        dino=scorer.dino_images(pictures),
        texts=scorer.clip_texts([prompt.text for prompt in prompts]),
        training_names=names,
        training_clip=scorer.clip_images(training) if training else None,
        training_dino=scorer.dino_images(training) if training else None,
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, DIGITS) + 0.0  # + 0.0: no -0.0 in the report


def strength_row(measured: Measured, strength: float) -> StrengthScores:
    """The scores at one strength (see StrengthScores)."""
    with_trigger, without = measured.rendered(strength, "with"), measured.rendered(strength, "without")
    dino, clip = measured.likeness(with_trigger, "dino"), measured.likeness(with_trigger, "clip")
    dino_without = measured.likeness(without, "dino")
    return StrengthScores(
        strength=strength,
        prompt_score=_round(measured.prompt_score(with_trigger)),
        prompt_score_without_trigger=_round(measured.prompt_score(without)),
        likeness_dino_mean=_round(dino.mean) if dino else None,
        likeness_dino_max=_round(dino.max) if dino else None,
        likeness_clip_mean=_round(clip.mean) if clip else None,
        likeness_clip_max=_round(clip.max) if clip else None,
        likeness_without_trigger_dino_mean=_round(dino_without.mean) if dino_without else None,
        control_shift=_round(measured.control_shift(strength)),
        diversity=_round(measured.diversity(strength)),
        nearest_training_image=measured.training_names[dino.nearest].as_posix() if dino else None,
    )


def evaluation_grid(job: EvaluationJob, images: dict, prompts: list[Prompt], control: str | None):
    """A row per strength, a column per prompt (with the trigger, first seed) and the control prompt, each
    cell labelled with its strength and column."""
    from PIL import Image, ImageDraw, ImageOps

    columns = [("with", index, f"prompt {index + 1}") for index in range(len(prompts))]
    if control is not None:
        columns.append(("control", 0, "control"))
    cell_height = GRID_CELL + GRID_LABEL_HEIGHT
    grid = Image.new("RGB", (GRID_CELL * len(columns), cell_height * len(job.strengths)), "white")
    draw = ImageDraw.Draw(grid)
    for row, strength in enumerate(job.strengths):
        for column, (kind, index, label) in enumerate(columns):
            left, top = column * GRID_CELL, row * cell_height
            cell = ImageOps.contain(images[(strength, kind, index, 0)].convert("RGB"), (GRID_CELL, GRID_CELL))
            grid.paste(cell, (left, top))
            draw.text((left + 4, top + GRID_CELL + 4), f"{strength:g} {label}", fill=(0, 0, 0))
    return grid


def evaluate(
    job: EvaluationJob,
    on_image: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
) -> EvaluationReport | None:
    """Render, score and write the report and grid into job.output_dir; None when stopped before the end."""
    prompts = prompts_of(job)
    control = control_of(job, prompts)
    plan = render_plan(job, prompts, control)
    from training.models.loading import pick_device

    # The scorers first: a model that is not here fails the job before minutes of rendering, not after.
    scorer = Scorer(job.clip_model, job.dino_model, pick_device())
    log.info("evaluating %s on %s: %d renders", job.lora, job.model_name, len(plan))
    images = render_all(job, plan, on_image, stop)
    if images is None:
        return None
    log.info("scoring with %s and %s", job.clip_model, job.dino_model)
    measured = measure(scorer, images, prompts, job.training_images)
    rows = [strength_row(measured, strength) for strength in job.strengths]
    best, verdicts = judge(rows)
    output = Path(job.output_dir)
    if not output.is_dir():  # its job was deleted meanwhile: a folder made again here would belong to no job
        raise FileNotFoundError(f"the run folder {output} is gone (its job was deleted): nothing is written")
    previous = read_report(output, job.step)
    # The grid first, under this run's own name, then the report naming it: a reader sees the old report with
    # its old grid or the new one with its new grid, never a mix.
    grid = grid_name(job.step, secrets.token_hex(4))
    with atomic_output(output / grid) as tmp:
        evaluation_grid(job, images, prompts, control).save(tmp, format="JPEG", quality=85)
    report = EvaluationReport(
        **job.model_dump(include={"job_id", "step", "lora", "model_name", "clip_model", "dino_model"}),
        prompts=[prompt.with_trigger for prompt in prompts],
        control_prompt=control,
        trigger_word=job.trigger_word,
        seeds=job.seeds,
        strengths=job.strengths,
        rows=rows,
        best_strength=best,
        verdicts=verdicts,
        grid=grid,
    )
    atomic_write_json(output / report_name(job.step), report.model_dump(mode="json"))
    if previous is not None and previous.grid != grid:
        (output / previous.grid).unlink(missing_ok=True)
    for verdict in verdicts:
        log.info("verdict: %s", verdict)
    return report


def run_evaluation_job(run_dir: Path, stop: threading.Event) -> str:
    """The background job: the EvaluationJob in `run_dir/request.json`, its log and status there."""
    from training.background_job import job_files

    job = EvaluationJob.model_validate_json((run_dir / "request.json").read_text(encoding="utf-8"))
    prompts = prompts_of(job)
    total = len(render_plan(job, prompts, control_of(job, prompts)))
    with job_files(run_dir, log, total) as (_, status):
        status.start()
        try:

            def progress(done: int, of: int) -> None:
                status.update(step=done, phase=f"rendering {done}/{of}" if done < of else "scoring")

            report = evaluate(job, on_image=progress, stop=stop)
            if report is None:
                status.finish("stopped")
                return "stopped"
            path = Path(job.output_dir) / report_name(job.step)
            status.finish("completed", phase="done", evaluation=str(path), verdicts=report.verdicts)
            return "completed"
        except Exception as exc:
            log.exception("evaluation failed")
            status.finish("failed", error=f"{type(exc).__name__}: {exc}")
            return "failed"


def main(argv: list[str] | None = None) -> int:
    """`python -m training.evaluation.run RUN_DIR`: the server's evaluation job."""
    from training.background_job import job_main

    return job_main("training.evaluation.run", argv, run_evaluation_job)


if __name__ == "__main__":
    from training.jobs.queue import exit_as_job

    exit_as_job(main)  # a job the queue started ends its row and starts the next queued job, server or not
