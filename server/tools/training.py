"""Config and job tools and resources: create and validate configs, start, watch, stop and resume training."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.mcpserver.utilities.types import Image
from mcp.types import ToolAnnotations
from pydantic import AliasChoices, BaseModel, Field

from server.configs import ConfigSummary, ValidationReport
from server.images import loss_curve_png, thumbnail_png
from server.jobs import JobStatus
from server.tools import READ_ONLY, Deleted, Services
from training.config import TrainingConfig
from training.workspace import read_jsonl


class ConfigResult(BaseModel):
    name: str
    config: dict[str, Any] = Field(description="Every option of the config, defaults included.")
    warnings: list[str] = Field(default_factory=list)
    next_step: str

    @classmethod
    def of(cls, config: TrainingConfig, next_step: str) -> ConfigResult:
        return cls(
            name=config.name, config=config.model_dump(mode="json"), warnings=config.warnings(), next_step=next_step
        )


ANY_JOB_ID = "Job id from start-training, or from generate-captions for a captioning job."


class ConfigList(BaseModel):
    configs: list[ConfigSummary]


class JobList(BaseModel):
    jobs: list[JobStatus]


def register_training_tools(server: MCPServer, s: Services) -> None:
    call, resource_call, configs, jobs = s.call, s.resource_call, s.configs, s.jobs
    read_only = READ_ONLY

    # --- configs -------------------------------------------------------------------------------
    def create_training_config(**values: Any) -> ConfigResult:
        given = {key: value for key, value in values.items() if value is not None}
        config = call(configs.create, given)
        return ConfigResult.of(
            config, f"validate-training-config name={config.name}, then start-training config_name={config.name}"
        )

    create_training_config.__signature__ = _config_signature()
    server.add_tool(
        create_training_config,
        name="create-training-config",
        description="Create a named training config. Give name, model_name (an SD 1.x/2.x, SDXL or FLUX model, e.g. "
        "runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0, black-forest-labs/FLUX.1-dev, or "
        "builtin:tiny-sd15 to try things out), dataset_path (a dataset name from list-datasets or a folder path), "
        "trigger_word and test_prompts; every other option has the guide's default (learning_rate 2e-4, rank 32, "
        "steps 100 x images) or the model family's (resolution, output format).",
    )

    @server.tool(name="list-configs", description="List saved training configs.", annotations=read_only)
    def list_configs() -> ConfigList:
        return ConfigList(configs=call(configs.list))

    @server.tool(name="get-config", description="Show one config with every option.", annotations=read_only)
    def get_config(name: str = Field(description="Config name, from list-configs.")) -> ConfigResult:
        config = call(configs.get, name)
        return ConfigResult.of(config, "start-training")

    @server.tool(
        name="update-training-config",
        description="Change options of a saved config, e.g. changes={'learning_rate': 1e-4, 'steps': 1500}. "
        "A null value puts an option back to its default. The config is saved only if the result is valid.",
    )
    def update_training_config(
        name: str = Field(description="Config name, from list-configs."),
        changes: dict[str, Any] = Field(description="Options to change, by name."),
    ) -> ConfigResult:
        config = call(configs.update, name, changes)
        return ConfigResult.of(config, f"validate-training-config name={name}")

    @server.tool(
        name="validate-training-config",
        description="Check a config before training: option errors, a missing or empty dataset, a model that "
        "cannot be found, and warnings. Call it before start-training.",
        annotations=read_only,
    )
    def validate_training_config(name: str = Field(description="Config name, from list-configs.")) -> ValidationReport:
        return call(configs.validate, name)

    @server.tool(
        name="delete-config",
        description="Delete a saved config (jobs already started from it are kept).",
        annotations=ToolAnnotations(destructiveHint=True),
    )
    def delete_config(name: str = Field(description="Config name, from list-configs.")) -> Deleted:
        call(configs.delete, name)
        return Deleted(name=name)

    # --- jobs ----------------------------------------------------------------------------------
    @server.tool(
        name="start-training",
        description="Start training a saved config in the background. Returns the job_id at once; the job is "
        "queued if another one is training. Then poll get-training-status.",
    )
    def start_training(config_name: str = Field(description="Config name, from list-configs.")) -> JobStatus:
        report = call(configs.validate, config_name)
        if not report.valid:
            raise ToolError(
                f"config {config_name!r} cannot train: {'; '.join(report.errors)}. "
                "Fix it with update-training-config, then start again."
            )
        record = call(jobs.start, config_name, call(configs.get_yaml, config_name))
        return call(jobs.status, record.job_id)

    @server.tool(
        name="get-training-status",
        description="State (queued, running, completed, failed, stopped, interrupted), step/total, percent, "
        "smoothed loss, lr, it/s, ETA, last checkpoint, latest sample names, LoRA path and error of a job.",
        annotations=read_only,
    )
    def get_training_status(job_id: str = Field(description=ANY_JOB_ID)) -> JobStatus:
        return call(jobs.status, job_id)

    @server.tool(
        name="get-training-logs",
        description="The last lines of a job's training log (and of its process output).",
        annotations=read_only,
    )
    def get_training_logs(
        job_id: str = Field(description=ANY_JOB_ID),
        lines: int = Field(50, ge=1, le=1000, description="How many lines from the end."),
    ) -> str:
        return call(jobs.logs, job_id, lines)

    @server.tool(
        name="stop-training",
        description="Stop a job gracefully: it finishes its step, saves a checkpoint and ends as 'stopped' "
        "(killed if it has not ended after 60 s). resume-training continues it later.",
        annotations=ToolAnnotations(destructiveHint=False, idempotentHint=False),
    )
    def stop_training(job_id: str = Field(description=ANY_JOB_ID)) -> JobStatus:
        call(jobs.stop, job_id)
        return call(jobs.status, job_id)

    @server.tool(
        name="resume-training",
        description="Continue a stopped, interrupted or failed job from its last checkpoint (same job_id).",
    )
    def resume_training(job_id: str = Field(description=ANY_JOB_ID)) -> JobStatus:
        call(jobs.resume, job_id)
        return call(jobs.status, job_id)

    @server.tool(name="list-training-jobs", description="Every job with its state and progress.", annotations=read_only)
    def list_training_jobs() -> JobList:
        return JobList(jobs=call(jobs.list))

    @server.tool(
        name="get-training-samples",
        description="The sample images a job rendered for its test prompts (step 0 is the untrained baseline), "
        "as images with their prompt and step; the last is the control prompt without the trigger word, which "
        "shows style bleeding if it changes. Without step: the latest samples. Also the images of a "
        "generate-image or compare-lora-strengths job.",
        annotations=read_only,
    )
    def get_training_samples(
        job_id: str = Field(description="Job id from start-training."),
        step: int | None = Field(None, ge=0, description="A sampling step; default: the latest."),
    ) -> list:
        status = call(lambda: jobs.training_status(job_id, also=("generation",)))
        return _sample_content(Path(status.run_dir), job_id, step)

    # --- resources ---------------------------------------------------------------------------
    @server.resource("lora://configs/{name}", mime_type="application/yaml", description="A saved config (YAML).")
    def config_resource(name: str) -> str:
        return resource_call(configs.get_yaml, name)

    @server.resource("lora://jobs/{job_id}/status", mime_type="application/json", description="A job's status.")
    def status_resource(job_id: str) -> str:
        return resource_call(jobs.status, job_id).model_dump_json(indent=2)

    @server.resource("lora://jobs/{job_id}/log", mime_type="text/plain", description="The last 200 log lines.")
    def log_resource(job_id: str) -> str:
        return resource_call(jobs.logs, job_id, 200)

    @server.resource(
        "lora://jobs/{job_id}/metrics",
        mime_type="text/csv",
        description="Per-step metrics (CSV), with the validation loss at the steps it was scored.",
    )
    def metrics_resource(job_id: str) -> str:
        rows = _metric_rows(Path(resource_call(jobs.status, job_id).run_dir))
        validation = {r["step"]: r["loss"] for r in rows if r.get("kind") == "validation"}
        columns = ["step", "loss", "lr", "grad_norm", "step_time", "time"]
        lines = [",".join([*columns, "validation_loss"])] + [
            ",".join("" if r.get(c) is None else str(r.get(c)) for c in columns) + f",{validation.get(r['step'], '')}"
            for r in rows
            if "kind" not in r
        ]
        return "\n".join(lines) + "\n"

    @server.resource("lora://jobs/{job_id}/samples/{filename}", mime_type="image/png", description="A sample image.")
    def sample_resource(job_id: str, filename: str) -> bytes:
        samples = Path(resource_call(jobs.status, job_id).run_dir) / "samples"
        path = samples / filename
        if "/" in filename or filename.startswith(".") or path.suffix != ".png" or not path.is_file():
            raise ResourceNotFoundError(f"job {job_id} has no sample {filename!r}; get-training-status lists them")
        return path.read_bytes()

    @server.resource("lora://jobs/{job_id}/loss-curve", mime_type="image/png", description="Loss and lr over steps.")
    def loss_curve_resource(job_id: str) -> bytes:
        return loss_curve_png(_metric_rows(Path(resource_call(jobs.status, job_id).run_dir)))


def _metric_rows(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


def _config_signature() -> inspect.Signature:
    """create-training-config takes every config option as an argument (the guide's flat form):
    the signature is built from TrainingConfig, so the tool's schema cannot drift from it.
    Options left out are not stored, so they keep the config model's defaults."""
    parameters = []
    for name, info in TrainingConfig.model_fields.items():
        description = info.description or ""
        if info.is_required():
            parameters.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=Field(description=description),
                    annotation=info.annotation,
                )
            )
            continue
        parameters.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=Field(None, description=description),
                annotation=info.annotation | None,
            )
        )
        if isinstance(info.validation_alias, AliasChoices):
            for alias in info.validation_alias.choices:
                if alias != name:
                    parameters.append(
                        inspect.Parameter(
                            alias,
                            inspect.Parameter.KEYWORD_ONLY,
                            default=Field(None, description=f"Same as {name}."),
                            annotation=info.annotation | None,
                        )
                    )
    return inspect.Signature(parameters, return_annotation=ConfigResult)


def _sample_content(run_dir: Path, job_id: str, step: int | None) -> list:
    rows = read_jsonl(run_dir / "samples" / "index.jsonl")
    if not rows:
        raise ToolError(f"job {job_id} has no samples yet (samples need test_prompts and sampling enabled)")
    steps = sorted({row["step"] for row in rows})
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise ToolError(f"job {job_id} has samples at steps {steps}; ask for one of them")
    content: list = []
    for row in (r for r in rows if r["step"] == chosen):
        control = " (control prompt, no trigger word: it should stay like step 0)" if row.get("control") else ""
        content.append(f"step {chosen}, prompt {row['prompt_index']}: {row['prompt']}{control}")
        content.append(Image(data=thumbnail_png(run_dir / "samples" / row["file"]), format="png"))
    return content
