"""Config and job tools and resources: create and validate configs, start, watch, stop and resume training."""

from __future__ import annotations

import inspect
from typing import Any

import anyio
from mcp.server import MCPServer
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

from server.configs import ConfigSummary, ImportConfigRequest, ImportedConfig, ValidationReport
from server.charts import loss_curve_png, samples_grid_jpeg
from server.images import RESULT_IMAGE_BUDGET, images_within_budget
from server.jobs import JobDeleted, JobStatus, PruneReport, PruneRequest
from server.resume_fix import ResumedJob, resume_job
from server.tools import READ_ONLY, Deleted, Services, add_tools, resource, tool
from server.tools.arguments import request_parameters
from server.training_runs import BaseModelDownload
from training.config import TrainingConfig
from training.guide import DEFAULT_LEARNING_RATE, STANDARD_RANK, STEPS_PER_IMAGE, lr_text


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
CONFIG_NAME = "Config name, from list-configs."


class ConfigList(BaseModel):
    configs: list[ConfigSummary]


class JobList(BaseModel):
    jobs: list[JobStatus]


def register_training_tools(server: MCPServer, s: Services) -> None:
    add_tools(server, ConfigTools(s))
    add_tools(server, JobTools(s))
    add_tools(server, TrainingResources(s))


class ConfigTools:
    """Saved configs: create, list, show, change, validate, delete."""

    def __init__(self, s: Services):
        self.call, self.configs = s.call, s.configs

    @tool(
        "create-training-config",
        "Create a named training config. Give name, model_name (an SD 1.x/2.x, SDXL or FLUX model, e.g. "
        "stable-diffusion-v1-5/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0, "
        "black-forest-labs/FLUX.1-dev, or builtin:tiny-sd15 to try things out), dataset_path (a dataset name from "
        "list-datasets or a folder path), "
        "trigger_word and test_prompts; every other option has the guide's default (learning_rate "
        f"{lr_text(DEFAULT_LEARNING_RATE)}, rank {STANDARD_RANK}, steps {STEPS_PER_IMAGE} x images) or the model "
        "family's (resolution, output format).",
    )
    def create_training_config(self, **values: Any) -> ConfigResult:
        # Every config option is an argument (the guide's flat form); options left out are not stored, so
        # they keep the config model's defaults, and ConfigService's own checks word every refusal.
        given = {key: value for key, value in values.items() if value is not None}
        config = self.call(self.configs.create, given)
        return ConfigResult.of(
            config, f"validate-training-config name={config.name}, then start-training config_name={config.name}"
        )

    create_training_config.__signature__ = inspect.Signature(
        [
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            *request_parameters(TrainingConfig, omitted_means_default=True),
        ],
        return_annotation=ConfigResult,
    )

    @tool("list-configs", "List saved training configs.", READ_ONLY)
    def list_configs(self) -> ConfigList:
        return ConfigList(configs=self.call(self.configs.list))

    @tool("get-config", "Show one config with every option.", READ_ONLY)
    def get_config(self, name: str = Field(description=CONFIG_NAME)) -> ConfigResult:
        return ConfigResult.of(self.call(self.configs.get, name), "start-training")

    @tool(
        "update-training-config",
        "Change options of a saved config, e.g. changes={'learning_rate': 1e-4, 'steps': 1500}. "
        "A null value puts an option back to its default. The config is saved only if the result is valid.",
    )
    def update_training_config(
        self,
        name: str = Field(description=CONFIG_NAME),
        changes: dict[str, Any] = Field(description="Options to change, by name."),
    ) -> ConfigResult:
        config = self.call(self.configs.update, name, changes)
        return ConfigResult.of(config, f"validate-training-config name={name}")

    @tool(
        "validate-training-config",
        "Check a config before training: option errors, a missing or empty dataset, a model that "
        "cannot be found, and warnings. Call it before start-training.",
        READ_ONLY,
    )
    def validate_training_config(self, name: str = Field(description=CONFIG_NAME)) -> ValidationReport:
        return self.call(self.configs.validate, name)

    @tool(
        "delete-config",
        "Delete a saved config (jobs already started from it are kept).",
        ToolAnnotations(destructiveHint=True),
    )
    def delete_config(self, name: str = Field(description=CONFIG_NAME)) -> Deleted:
        self.call(self.configs.delete, name)
        return Deleted(name=name)

    @tool(
        "import-config",
        "Import a config of another trainer as a saved config: a kohya sd-scripts TOML or kohya_ss JSON (with its "
        "dataset TOML: [[datasets]] in the same text, or the dataset_config file beside it) or an ai-toolkit YAML "
        "(its first sd_trainer process). Returns the config and every source key it could not map, with why. "
        "Check dataset_path and model_name, then validate-training-config.",
        request=ImportConfigRequest,
    )
    def import_config(self, request: ImportConfigRequest) -> ImportedConfig:
        return self.call(self.configs.import_config, request)


class JobTools:
    """Training jobs: start, watch, stop, resume, and the samples they render."""

    def __init__(self, s: Services):
        self.call, self.jobs, self.training = s.call, s.jobs, s.training

    @tool(
        "start-training",
        "Start training a saved config in the background. Returns the job_id at once; the job is "
        "queued if another one is training. Then poll get-training-status.",
    )
    def start_training(self, config_name: str = Field(description=CONFIG_NAME)) -> JobStatus:
        return self.call(self.training.start, config_name)

    @tool(
        "download-base-model",
        "Download a base model (a diffusers pipeline on the Hugging Face hub), or a CLIP or DINOv2 model "
        "(transformers) that evaluate-lora scores with, into this machine's HF cache as a background job: returns "
        "its job_id at once; get-training-status shows bytes_done / bytes_total and bytes_per_s. Only the files "
        "the model needs; a disk-space check first; stop-training and resume-training continue it where it "
        "stopped. start-training does this by itself for a model that is not here (the training waits for the "
        "download).",
        ToolAnnotations(destructiveHint=False, idempotentHint=False, openWorldHint=True),
        request=BaseModelDownload,
    )
    def download_base_model(self, request: BaseModelDownload) -> JobStatus:
        return self.call(self.training.download_base_model, request)

    @tool(
        "get-training-status",
        "State (queued, running, completed, failed, stopped, interrupted), step/total, percent, "
        "smoothed loss, lr, it/s, ETA, last checkpoint, latest sample names, LoRA path and error of a job; for a "
        "download job, bytes_done / bytes_total and bytes_per_s; for a queued job, the job it waits_for.",
        READ_ONLY,
    )
    def get_training_status(self, job_id: str = Field(description=ANY_JOB_ID)) -> JobStatus:
        return self.call(self.jobs.status, job_id)

    @tool("get-training-logs", "The last lines of a job's training log (and of its process output).", READ_ONLY)
    def get_training_logs(
        self,
        job_id: str = Field(description=ANY_JOB_ID),
        lines: int = Field(50, ge=1, le=1000, description="How many lines from the end."),
    ) -> str:
        return self.call(self.jobs.logs, job_id, lines)

    @tool(
        "stop-training",
        "Stop a job gracefully: it finishes its step, saves a checkpoint and ends as 'stopped' "
        "(killed if it has not ended after 60 s). A queued job is cancelled before it starts (it ends 'stopped' "
        "and its error says so). resume-training continues (or queues) it later.",
        ToolAnnotations(destructiveHint=False, idempotentHint=False),
    )
    def stop_training(self, job_id: str = Field(description=ANY_JOB_ID)) -> JobStatus:
        self.call(self.jobs.stop, job_id)
        return self.call(self.jobs.status, job_id)

    @tool(
        "resume-training",
        "Continue a stopped, interrupted or failed job from its last checkpoint (same job_id). With apply_fix (a "
        "finding id from diagnose-training, e.g. out-of-memory) it continues with that finding's config change "
        "(returned as changes); a fix of rank, alpha, model or dataset needs a new run: apply-fix.",
    )
    def resume_training(
        self,
        job_id: str = Field(description=ANY_JOB_ID),
        apply_fix: str | None = Field(
            None, description="A training job's finding id from diagnose-training whose patch to resume with."
        ),
    ) -> ResumedJob:
        return self.call(resume_job, self.jobs, job_id, apply_fix)

    @tool(
        "delete-job",
        "Delete a finished job (completed, failed, stopped or interrupted): its entry and its run directory "
        "(checkpoints, samples, the LoRA inside it). LoRAs exported outside the run directory are kept. A queued "
        "or running job is refused: stop-training it first.",
        ToolAnnotations(destructiveHint=True, idempotentHint=False),
    )
    def delete_job(self, job_id: str = Field(description=ANY_JOB_ID)) -> JobDeleted:
        return self.call(self.jobs.delete, job_id)

    @tool(
        "prune-runs",
        "Free disk space of finished jobs: delete old checkpoints (keeping the newest keep_checkpoints and the "
        "one diagnose-training recommends) and the latent and text caches. The LoRA, samples and metrics stay. "
        "Reports each run's size before and after. Queued and running jobs are never touched; a stopped job "
        "still resumes from its newest checkpoint.",
        ToolAnnotations(destructiveHint=True, idempotentHint=True),
        request=PruneRequest,
    )
    def prune_runs(self, request: PruneRequest) -> PruneReport:
        return self.call(self.jobs.prune, request)

    @tool("list-training-jobs", "Every job with its state and progress.", READ_ONLY)
    def list_training_jobs(self) -> JobList:
        return JobList(jobs=self.call(self.jobs.list))

    @tool(
        "get-training-samples",
        "The sample images a job rendered for its test prompts (step 0 is the untrained baseline), "
        "as images with their prompt and step; the last is the control prompt without the trigger word, which "
        "shows style bleeding if it changes. Without step: the latest samples. Also the images of a "
        "generate-image or compare-lora-strengths job.",
        READ_ONLY,
    )
    def get_training_samples(
        self,
        job_id: str = Field(description="Job id from start-training."),
        step: int | None = Field(None, ge=0, description="A sampling step; default: the latest."),
    ) -> list:
        samples = self.call(self.training.samples, job_id, step)
        where_all = f"lora://jobs/{job_id}/samples-grid shows every step and prompt in one image."
        return images_within_budget(samples, where_all)


class TrainingResources:
    """Configs and jobs as resources a client can read or subscribe to."""

    def __init__(self, s: Services):
        self.resource_call, self.configs, self.jobs, self.training = s.resource_call, s.configs, s.jobs, s.training

    @resource("lora://configs/{name}", "application/yaml", "A saved config (YAML).")
    def config_resource(self, name: str) -> str:
        return self.resource_call(self.configs.get_yaml, name)

    @resource("lora://jobs/{job_id}/status", "application/json", "A job's status.")
    def status_resource(self, job_id: str) -> str:
        return self.resource_call(self.jobs.status, job_id).model_dump_json(indent=2)

    @resource("lora://jobs/{job_id}/log", "text/plain", "The last 200 log lines.")
    def log_resource(self, job_id: str) -> str:
        return self.resource_call(self.jobs.logs, job_id, 200)

    @resource(
        "lora://jobs/{job_id}/metrics",
        "text/csv",
        "Per-step metrics (CSV), with the validation loss at the steps it was scored.",
    )
    def metrics_resource(self, job_id: str) -> str:
        return self.resource_call(self.training.metrics_csv, job_id)

    @resource("lora://jobs/{job_id}/samples/{filename}", "image/png", "A sample image.")
    def sample_resource(self, job_id: str, filename: str) -> bytes:
        return self.resource_call(self.training.sample_path, job_id, filename).read_bytes()

    # The charts are read and drawn in a worker thread, off the event loop that serves every request:
    # a 10,000-step curve takes ~0.5 s, and matplotlib's first import ~0.5 s more (one core of a 2-core CI machine).
    @resource(
        "lora://jobs/{job_id}/loss-curve",
        "image/png",
        "Over the step: the loss (raw, and smoothed as the status's loss is), the validation loss, the learning "
        "rate and the gradient norm.",
    )
    async def loss_curve_resource(self, job_id: str) -> bytes:
        return await anyio.to_thread.run_sync(
            lambda: loss_curve_png(self.resource_call(self.training.metric_rows, job_id))
        )

    @resource(
        "lora://jobs/{job_id}/samples-grid",
        "image/jpeg",
        "A job's samples as one image: a row per sampling step, a column per test prompt, the control prompt "
        f"framed in red; within {RESULT_IMAGE_BUDGET // 1000} KB of base64.",
    )
    async def samples_grid_resource(self, job_id: str) -> bytes:
        return await anyio.to_thread.run_sync(
            lambda: samples_grid_jpeg(self.resource_call(self.training.sample_table, job_id))
        )
