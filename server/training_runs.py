"""Training as a front end sees it: a saved config starts only when it validates, and a run's outputs
(its metrics, its samples) are read by job id.

`JobService.start` queues whatever YAML it is given (its tests start broken configs on purpose, to
see the job fail); this service is what the tools call, so every front end refuses an invalid config
before a job exists, with the same message. It reads the run directory the trainer writes
(`training/README.md`: metrics.jsonl, samples/index.jsonl and the sample PNGs).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, Field

from server.charts import SampleTable
from server.configs import ConfigService
from server.errors import ServiceError, WorkspaceStateError
from server.jobs import JobService, JobStatus
from server.names import plain_filename_problem
from training.workspace import read_jsonl

# metrics.jsonl's per-step columns, in the CSV's order; validation rows (kind "validation") add a column.
METRIC_COLUMNS = ("step", "loss", "lr", "grad_norm", "step_time", "time")


class Sample(NamedTuple):
    caption: str  # which step and prompt the image shows, said for the assistant
    path: Path


class BaseModelDownload(BaseModel):
    """download-base-model: a diffusers pipeline (or evaluate-lora's CLIP/DINOv2, a transformers model) from the
    Hugging Face hub into this machine's HF cache."""

    model_name: str = Field(
        description="A Hugging Face id of a diffusers pipeline (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5, "
        "stabilityai/stable-diffusion-xl-base-1.0), as model_name of a config names it, or of a transformers model "
        "evaluate-lora scores with, as its clip_model or dino_model names it (e.g. openai/clip-vit-large-patch14, "
        "facebook/dinov2-small). Built-in models, local paths and models already cached are refused: there is "
        "nothing to download."
    )


class TrainingService:
    def __init__(self, configs: ConfigService, jobs: JobService):
        self.configs = configs
        self.jobs = jobs

    def start(self, config_name: str) -> JobStatus:
        """Queue a training job for a saved config, if validate-training-config finds no error in it. A hub
        model that is not cached (on a machine that is online) is downloaded first: a download job is queued
        (or the one already downloading it joined) and the training waits for it."""
        report = self.configs.validate(config_name)
        if not report.valid:
            raise WorkspaceStateError(
                f"config {config_name!r} cannot train: {'; '.join(report.errors)}. "
                "Fix it with update-training-config, then start again."
            )
        download = self._download_first(self.configs.get(config_name).model_name)
        record = self.jobs.start(config_name, self.configs.get_yaml(config_name), after=download)
        return self.jobs.status(record.job_id)

    def _download_first(self, model_name: str) -> str | None:
        """The job id of the download a training of `model_name` must wait for, or None when it is here."""
        from training.models.source import ModelNotCachedError, ModelNotFoundError, resolve_model

        try:
            resolve_model(model_name)
        except ModelNotCachedError as missing:
            return self.jobs.start_download(missing.repo_id, join=True).job_id
        except ModelNotFoundError:
            pass  # a single file's config folder and the like: validation said what it could, the run says the rest
        return None

    def download_base_model(self, request: BaseModelDownload) -> JobStatus:
        """Queue the download of a hub model into the HF cache, as a background job (never in the call)."""
        from huggingface_hub.constants import HF_HUB_OFFLINE

        from training.models.source import ModelNotFoundError, download_target

        try:
            repo_id = download_target(request.model_name)
        except ModelNotFoundError as exc:
            raise ServiceError(f"{exc}; nothing was downloaded") from None
        if HF_HUB_OFFLINE:
            raise ServiceError(
                f"this machine is offline (HF_HUB_OFFLINE is set): {repo_id} cannot be downloaded here. Unset it and "
                f"restart the server, or download it elsewhere (huggingface-cli download {repo_id}) and copy the cache"
            )
        return self.jobs.status(self.jobs.start_download(repo_id).job_id)

    # --- metrics -------------------------------------------------------------------------------
    def metric_rows(self, job_id: str) -> list[dict]:
        """metrics.jsonl's rows: one per logged step, plus the validation rows (kind "validation")."""
        return read_jsonl(self._run_dir(job_id) / "metrics.jsonl")

    def metrics_csv(self, job_id: str) -> str:
        """One CSV line per logged step, with the validation loss in the steps it was scored at."""
        rows = self.metric_rows(job_id)
        validation = {row["step"]: row["loss"] for row in rows if row.get("kind") == "validation"}
        lines = [",".join([*METRIC_COLUMNS, "validation_loss"])] + [
            ",".join("" if row.get(c) is None else str(row.get(c)) for c in METRIC_COLUMNS)
            + f",{validation.get(row['step'], '')}"
            for row in rows
            if "kind" not in row
        ]
        return "\n".join(lines) + "\n"

    # --- samples -------------------------------------------------------------------------------
    def samples(self, job_id: str, step: int | None) -> list[Sample]:
        """The images a training (or generation) job rendered at `step`, default the latest step, in
        prompt order; the control prompt (no trigger word) is said as such."""
        folder, rows = self._sample_rows(job_id)
        steps = sorted({row["step"] for row in rows})
        chosen = steps[-1] if step is None else step
        if chosen not in steps:
            raise WorkspaceStateError(f"job {job_id} has samples at steps {steps}; ask for one of them")
        samples = []
        for row in (r for r in rows if r["step"] == chosen):
            control = " (control prompt, no trigger word: it should stay like step 0)" if row.get("control") else ""
            caption = f"step {chosen}, prompt {row['prompt_index']}: {row['prompt']}{control}"
            samples.append(Sample(caption, folder / row["file"]))
        return samples

    def sample_table(self, job_id: str) -> SampleTable:
        """Every sample of a job by step and prompt, for the samples grid."""
        table = SampleTable.of(*self._sample_rows(job_id))
        if not table.files:
            raise WorkspaceStateError(f"job {job_id}'s sample images are gone from its run directory")
        return table

    def _sample_rows(self, job_id: str) -> tuple[Path, list[dict]]:
        """A training (or generation) job's samples folder and its index.jsonl rows; none is an error."""
        folder = Path(self.jobs.training_status(job_id, also=("generation",)).run_dir) / "samples"
        rows = read_jsonl(folder / "index.jsonl")
        if not rows:
            raise WorkspaceStateError(
                f"job {job_id} has no samples yet (samples need test_prompts and sampling enabled)"
            )
        return folder, rows

    def sample_path(self, job_id: str, filename: str) -> Path:
        """The PNG `filename` among a job's samples (as get-training-status lists them)."""
        path = self._run_dir(job_id) / "samples" / filename
        if plain_filename_problem(filename) or path.suffix != ".png" or not path.is_file():
            raise WorkspaceStateError(f"job {job_id} has no sample {filename!r}; get-training-status lists them")
        return path

    def _run_dir(self, job_id: str) -> Path:
        return Path(self.jobs.status(job_id).run_dir)
