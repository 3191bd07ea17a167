"""evaluate-lora: which LoRA, base model, prompts and training images an evaluation scores, checked and
resolved before a job exists; and the report and grid it wrote, by job id.

The scoring renders a few dozen images and loads CLIP and DINOv2: it always runs as a background job of
its own kind (`python -m training.evaluation.run RUN_DIR`, training/evaluation/), which writes
`evaluation.json` and its grid into the folder of the training run evaluated, so that the report is found
by that run's job id (and by the evaluation job's). A LoRA file from no run here is reported in the
evaluation job's own folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, Field, ValidationError

from server.errors import ServiceError, WorkspaceStateError
from server.inspection import model_geometry
from server.jobs import JobService, JobStatus
from server.lora_tools import lora_path
from server.loras import job_lora_file
from server.safetensors_file import InvalidSafetensors, safetensors_metadata
from training.config import ConfigError, TrainingConfig
from training.data.captions import fill_trigger, without_trigger
from training.evaluation.report import EvaluationReport, read_report
from training.evaluation.request import EvaluationJob, EvaluationRequest
from training.evaluation.tiny_scorers import is_tiny_scorer
from training.run_files import RUN_KEY

LABEL_LENGTH = 60  # of the job id's "eval-<label>-<time>-<hex>": job ids stay under the 100 characters of a name


class EvaluationStarted(BaseModel):
    job_id: str = Field(description="The evaluation job: watch it with get-training-status.")
    evaluated_job: str | None = Field(
        None, description="The training job evaluated (its run gets the report); None: a LoRA file from no run here."
    )
    lora: str = Field(description="The LoRA file scored.")
    model_name: str
    prompts: list[str]
    control_prompt: str | None
    likeness: bool = Field(description="Whether likeness to the training images is measured (their folder is known).")
    next_step: str


class _Subject(NamedTuple):
    """What the evaluation scores, before the job's folder exists."""

    lora: Path
    recorded: dict  # the LoRA file's training_config metadata ({} when none)
    config: TrainingConfig | None = None  # the run's, where the LoRA comes from a training job here
    run_dir: Path | None = None  # that job's folder: where the report goes
    job_id: str | None = None  # that job's id
    step: int | None = None  # the checkpoint's step; None: the job's final LoRA (or a file from no run here)


def start_evaluation(workspace: Path, jobs: JobService, request: EvaluationRequest) -> EvaluationStarted:
    """Check the request, resolve it to an EvaluationJob and queue it: a LoRA, base model or prompts that
    cannot be had are refused here, with what to give instead, rather than in the job."""
    subject = _subject(workspace, jobs, request)
    # The run's config, else the one the file records (no paths in it): the model, prompts and trigger word
    settings = subject.config.model_dump(mode="json") if subject.config else subject.recorded
    model = request.model_name or settings.get("model_name")
    if not model:
        raise ServiceError(
            f"{subject.lora.name} does not record its base model: give model_name, the model it was trained on"
        )
    model_geometry(model)  # a model that is not here is refused now, not after the job has waited for a GPU
    trigger = settings.get("trigger_word")
    prompts = [fill_trigger(prompt, trigger) for prompt in request.prompts or settings.get("test_prompts") or []]
    if not prompts:
        raise ServiceError(
            f"no prompts to render: {subject.job_id or subject.lora.name} has no test_prompts recorded; give prompts, "
            "each with the LoRA's trigger word"
        )
    _check_scorers(request)
    # As the run's samples choose it (training.data.captions.control_prompt), from the prompts rendered here.
    words = [trigger, *(settings.get("trigger_words") or {}).values()]
    control = settings.get("control_prompt") or without_trigger(prompts[0], words)
    config = subject.config
    images = config.dataset_path if config and Path(config.dataset_path).is_dir() else None
    fields = request.model_dump(exclude={"lora", "model_name", "prompts", "job_id", "step"})
    resolved = {
        **fields,
        "job_id": subject.job_id,
        "step": subject.step,
        "lora": str(subject.lora),
        "model_name": model,
        "prompts": prompts,
        "trigger_word": trigger,
        "control_prompt": control,
        "training_images": images,
    }
    # rendered as the run's samples were, where it says how
    rendering = {"steps": "sample_steps", "guidance": "sample_guidance_scale", "resolution": "resolution"}
    resolved |= {field: settings[name] for field, name in rendering.items() if settings.get(name) is not None}
    try:  # checked before the job's folder exists, which a LoRA from no run here is reported in
        job = EvaluationJob(**resolved, output_dir=str(subject.run_dir or workspace))
    except ValidationError as exc:  # e.g. a run sampled at more steps or pixels than an evaluation renders
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ServiceError(
            f"cannot render this LoRA as its run's samples were ({problems}): export-model it and evaluate the file "
            "with lora and model_name"
        ) from None
    what = subject.job_id or str(subject.lora)
    record = jobs.start_evaluation(
        what if subject.step is None else f"{what} step {subject.step}",
        (subject.job_id or subject.lora.stem)[:LABEL_LENGTH],
        lambda own: job if subject.run_dir else job.model_copy(update={"output_dir": str(own)}),
    )
    # keyed by the training job evaluated (its final LoRA's or the checkpoint's); a file from no run here: by the
    # evaluation job
    keyed, step = (subject.job_id, subject.step) if subject.job_id else (record.job_id, None)
    where, grid = report_resource(keyed, step), report_resource(keyed, step, "evaluation-grid")
    return EvaluationStarted(
        job_id=record.job_id,
        evaluated_job=subject.job_id,
        lora=str(subject.lora),
        model_name=model,
        prompts=prompts,
        control_prompt=control,
        likeness=images is not None,
        next_step=f"Poll get-training-status job_id={record.job_id}: once it is completed its verdicts say whether "
        f"the LoRA works and at which strength, and {where} has every score (the grid: {grid}).",
    )


def evaluation_report(jobs: JobService, job_id: str, step: str | None = None) -> EvaluationReport:
    """The evaluation of a training job's final LoRA (or of its checkpoint at `step`), or the report an
    evaluation job wrote."""
    folder, at = _report_place(jobs.status(job_id), step)
    report = read_report(folder, at)
    if report is None:
        what = f"job {job_id}" if at is None else f"job {job_id}'s checkpoint at step {at}"
        again = "" if at is None else f" step={at}"
        raise WorkspaceStateError(
            f"{what} has no evaluation yet: evaluate-lora job_id={job_id}{again} scores its LoRA (a background job; "
            "an evaluation job's report exists once it is completed)"
        )
    return report


def evaluation_grid(jobs: JobService, job_id: str, step: str | None = None) -> bytes:
    """The labelled grid (JPEG) beside a job's evaluation (of its checkpoint at `step`)."""
    folder, _ = _report_place(jobs.status(job_id), step)
    path = folder / evaluation_report(jobs, job_id, step).grid
    if not path.is_file():
        raise WorkspaceStateError(f"job {job_id}'s evaluation grid {path.name} is gone; evaluate-lora makes it again")
    return path.read_bytes()


def report_resource(job_id: str, step: int | None, what: str = "evaluation") -> str:
    """The resource of the evaluation (`what`: or "evaluation-grid") of a training job's final LoRA, or of its
    checkpoint at `step`."""
    return f"lora://jobs/{job_id}/{what}" + ("" if step is None else f"-step{step}")


# --- helpers -----------------------------------------------------------------------------------
def _report_place(status: JobStatus, step: str | None) -> tuple[Path, int | None]:
    """Where a job's evaluation is: a training run's folder (its final LoRA's, or the checkpoint's at `step`),
    or, for an evaluation job, the folder and checkpoint step it reported for."""
    if status.kind == "evaluation":
        if step is not None:
            raise WorkspaceStateError(
                f"job {status.job_id} is an evaluation job: its report is {report_resource(status.job_id, None)}; "
                "a checkpoint's evaluation is read by the training job's id"
            )
        try:
            request = evaluation_request(Path(status.run_dir))
        except (OSError, ValueError):
            raise WorkspaceStateError(f"evaluation job {status.job_id}'s request.json is gone or damaged") from None
        return Path(request.output_dir), request.step
    if status.kind != "training":
        raise WorkspaceStateError(
            f"job {status.job_id} is a {status.kind} job: only a training job's LoRA, or an evaluation job, has an "
            "evaluation"
        )
    if step is not None and not (step.isdigit() and int(step) >= 1):
        raise ServiceError(f"evaluation-step{step}: the step is a checkpoint's step number, e.g. evaluation-step500")
    return Path(status.run_dir), None if step is None else int(step)


def _check_scorers(request: EvaluationRequest) -> None:
    """The CLIP and DINOv2 models are here before the job starts: the child loads them from a local folder or
    the Hugging Face cache only (it downloads nothing), and would fail after a torch import and a queue wait.
    Torch-free: a hub model counts as here when its config.json is cached (a download-base-model job places it
    last, so a partial download does not count)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    for field, role, name in (("clip_model", "CLIP", request.clip_model), ("dino_model", "DINOv2", request.dino_model)):
        if is_tiny_scorer(name) or Path(name).is_dir():
            continue
        try:
            cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
        except HFValidationError:  # neither a folder here nor a hub id
            cached = False
        if not cached:
            raise ServiceError(
                f"the {role} model {name!r} is neither a folder here nor in this machine's Hugging Face cache, and "
                f"evaluate-lora downloads nothing itself: start download-base-model model_name={name} (a background "
                f"job; poll get-training-status) and evaluate again once it is completed, or give {field} a local "
                "folder of the model; builtin:tiny-clip and builtin:tiny-dinov2 only test the arithmetic (their "
                "numbers mean nothing)"
            )


def _subject(workspace: Path, jobs: JobService, request: EvaluationRequest) -> _Subject:
    if request.job_id is not None:
        status = jobs.training_status(request.job_id)
        run_dir = Path(status.run_dir)
        lora, _ = job_lora_file(request.job_id, run_dir, request.step)
        try:
            recorded = _recorded(safetensors_metadata(lora))
        except InvalidSafetensors as exc:
            raise WorkspaceStateError(f"job {request.job_id}'s LoRA {lora.name} is damaged ({exc})") from None
        return _Subject(lora, recorded, _run_config(run_dir), run_dir, request.job_id, request.step)
    lora = lora_path(workspace, request.lora)  # a valid safetensors file, or refused
    metadata = safetensors_metadata(lora)
    run = metadata.get(RUN_KEY)  # the job id of the run that trained it, under the server
    try:
        status = jobs.training_status(run) if run else None
    except ServiceError:  # a run of another workspace, or deleted since
        status = None
    if status is None or not (Path(status.run_dir) / "config.yaml").is_file():
        return _Subject(lora, _recorded(metadata))
    # A LoRA a training job here made (exported, or a file of its run) is reported with that job, by its id; an
    # exported checkpoint (kohya's ss_steps short of the run's last step) as that checkpoint's.
    saved = metadata.get("ss_steps", "")
    step = int(saved) if saved.isdigit() and int(saved) != status.step else None
    run_dir = Path(status.run_dir)
    return _Subject(lora, _recorded(metadata), _run_config(run_dir), run_dir, status.job_id, step)


def _run_config(run_dir: Path) -> TrainingConfig:
    try:
        return TrainingConfig.load(run_dir / "config.yaml")
    except ConfigError as exc:
        raise WorkspaceStateError(
            f"the run's config {run_dir / 'config.yaml'} no longer reads ({exc}): restore it (the evaluation takes "
            "the base model, prompts and training images from it)"
        ) from None


def _recorded(metadata: dict[str, str]) -> dict:
    """The training config a LoRA file of ours records (model_name, trigger_word, ...); {} for another's."""
    try:
        recorded = json.loads(metadata.get("training_config", "{}"))
    except json.JSONDecodeError:
        return {}
    return recorded if isinstance(recorded, dict) else {}


def evaluation_request(run_dir: Path) -> EvaluationJob:
    """The request.json of the evaluation job whose folder is `run_dir`: the LoRA it scored and where it reported."""
    return EvaluationJob.model_validate_json((run_dir / "request.json").read_text(encoding="utf-8"))
