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

from server.configs import ConfigService
from server.errors import WorkspaceStateError
from server.jobs import JobService, JobStatus
from server.names import plain_filename_problem
from training.workspace import read_jsonl

# metrics.jsonl's per-step columns, in the CSV's order; validation rows (kind "validation") add a column.
METRIC_COLUMNS = ("step", "loss", "lr", "grad_norm", "step_time", "time")


class Sample(NamedTuple):
    caption: str  # which step and prompt the image shows, said for the assistant
    path: Path


class TrainingService:
    def __init__(self, configs: ConfigService, jobs: JobService):
        self.configs = configs
        self.jobs = jobs

    def start(self, config_name: str) -> JobStatus:
        """Queue a training job for a saved config, if validate-training-config finds no error in it."""
        report = self.configs.validate(config_name)
        if not report.valid:
            raise WorkspaceStateError(
                f"config {config_name!r} cannot train: {'; '.join(report.errors)}. "
                "Fix it with update-training-config, then start again."
            )
        record = self.jobs.start(config_name, self.configs.get_yaml(config_name))
        return self.jobs.status(record.job_id)

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
        run_dir = Path(self.jobs.training_status(job_id, also=("generation",)).run_dir)
        rows = read_jsonl(run_dir / "samples" / "index.jsonl")
        if not rows:
            raise WorkspaceStateError(
                f"job {job_id} has no samples yet (samples need test_prompts and sampling enabled)"
            )
        steps = sorted({row["step"] for row in rows})
        chosen = steps[-1] if step is None else step
        if chosen not in steps:
            raise WorkspaceStateError(f"job {job_id} has samples at steps {steps}; ask for one of them")
        samples = []
        for row in (r for r in rows if r["step"] == chosen):
            control = " (control prompt, no trigger word: it should stay like step 0)" if row.get("control") else ""
            caption = f"step {chosen}, prompt {row['prompt_index']}: {row['prompt']}{control}"
            samples.append(Sample(caption, run_dir / "samples" / row["file"]))
        return samples

    def sample_path(self, job_id: str, filename: str) -> Path:
        """The PNG `filename` among a job's samples (as get-training-status lists them)."""
        path = self._run_dir(job_id) / "samples" / filename
        if plain_filename_problem(filename) or path.suffix != ".png" or not path.is_file():
            raise WorkspaceStateError(f"job {job_id} has no sample {filename!r}; get-training-status lists them")
        return path

    def _run_dir(self, job_id: str) -> Path:
        return Path(self.jobs.status(job_id).run_dir)
