"""The MCP server: thin tool wrappers over the config and job services.

Tool and argument names are the LoRA training guide's (hyphenated). Every tool returns a
pydantic model (structured content plus its JSON as text) or MCP content; a bad input raises
ToolError with a message that says what was wrong and what to call next. Nothing here imports
torch or diffusers: the training runs in `lora-train` child processes.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
from mcp import types
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.mcpserver.utilities.types import Image
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated
from mcp.types import ToolAnnotations
from pydantic import AliasChoices, BaseModel, Field

from server.captions import CaptionRun, generate_captions
from server.configs import ConfigService, ConfigSummary, ValidationReport
from server.datasets import (
    CaptionUpdateResult,
    DatasetService,
    DatasetSummary,
    ImportResult,
    UploadImage,
    UploadResult,
)
from server.errors import ServiceError
from server.inspection import CaptionLintResult, caption_lint, dataset_info
from server.jobs import JobService, JobStatus
from server.limits import megabytes
from server.loras import DEFAULT_CHUNK, MAX_CHUNK, Chunk, ExportedLora, LoraService
from server.names import checked_name
from server.system import SystemStats, system_stats
from server.uploads import DEFAULT_CHUNK_SIZE, ChunkReceived, UploadFinished, UploadService, UploadStarted
from training.config import LoraType, TrainingConfig
from training.data.dataset import IMAGE_SUFFIXES
from training.data.report import DatasetReport

log = logging.getLogger("server")
MONITOR_SECONDS = 1.0  # how often finished jobs are noticed, queued ones started, and subscribers notified
SAMPLE_MAX_SIDE = 384  # sample images are downscaled to this so a result of several stays well under 1 MB

INSTRUCTIONS = """Trains LoRAs for Stable Diffusion in the background.
Typical flow: create-training-config (name, model_name, dataset_path, trigger_word, test_prompts) ->
validate-training-config -> start-training (returns a job_id at once) -> get-training-status every
minute or so -> get-training-samples to look at progress -> the LoRA path is in the final status.
Training takes minutes to hours: never wait inside a tool call, poll get-training-status."""


class ConfigResult(BaseModel):
    name: str
    config: dict[str, Any] = Field(description="Every option of the config, defaults included.")
    warnings: list[str] = Field(default_factory=list)
    next_step: str


class ConfigList(BaseModel):
    configs: list[ConfigSummary]


class JobList(BaseModel):
    jobs: list[JobStatus]


class DatasetList(BaseModel):
    datasets: list[DatasetSummary]


class LoraList(BaseModel):
    loras: list[ExportedLora]


class Deleted(BaseModel):
    name: str
    deleted: bool = True


def build_server(workspace: Path) -> MCPServer:
    workspace = Path(workspace)
    configs = ConfigService(workspace)
    jobs = JobService(workspace)
    loras = LoraService(workspace)
    datasets = DatasetService(workspace)
    uploads = UploadService(workspace, max_total_size=megabytes("LORA_MCP_MAX_UPLOAD_MB", 4096))
    lock = threading.Lock()  # tools run in worker threads; the job service is not re-entrant

    def call(fn: Callable, *args, error: type[Exception] = ToolError):
        """Run a service call; its ServiceError becomes the ToolError the assistant reads (or, for a
        resource, the not-found error its reader gets)."""
        try:
            with lock:
                return fn(*args)
        except ServiceError as exc:
            raise error(str(exc)) from None

    def resource_call(fn: Callable, *args):
        return call(fn, *args, error=ResourceNotFoundError)

    @asynccontextmanager
    async def lifespan(_server: MCPServer) -> AsyncIterator[None]:
        """Reconcile the job table at start-up and keep it current while the server runs."""

        async def monitor() -> None:
            seen: dict[str, tuple] = {}
            while True:
                try:
                    statuses = await anyio.to_thread.run_sync(lambda: call(jobs.list))
                    for status in statuses:
                        # What a watcher cares about; a change notifies subscribers of the status resource.
                        fingerprint = (status.state, status.step, status.last_checkpoint, tuple(status.latest_samples))
                        if seen.get(status.job_id) != fingerprint:
                            seen[status.job_id] = fingerprint
                            await notify_updated(f"lora://jobs/{status.job_id}/status")
                except Exception:  # keep monitoring; the next tick retries
                    log.exception("job monitor tick failed")
                await anyio.sleep(MONITOR_SECONDS)

        async with anyio.create_task_group() as group:
            group.start_soon(monitor)
            yield
            group.cancel_scope.cancel()

    # Status updates reach subscribers of both protocol eras: `subscriptions/listen` streams
    # (2026-07-28) through the bus, and sessions that sent `resources/subscribe` (earlier versions)
    # through a resources/updated notification on their session.
    bus = InMemorySubscriptionBus()
    legacy_subscribers: dict[str, set] = {}

    async def notify_updated(uri: str) -> None:
        await bus.publish(ResourceUpdated(uri=uri))
        for session in list(legacy_subscribers.get(uri, ())):
            try:
                await session.send_resource_updated(uri)
            except Exception:  # the client went away: forget it
                legacy_subscribers[uri].discard(session)

    async def subscribe(ctx, params: types.SubscribeRequestParams) -> types.EmptyResult:
        legacy_subscribers.setdefault(str(params.uri), set()).add(ctx.session)
        return types.EmptyResult()

    async def unsubscribe(ctx, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        legacy_subscribers.get(str(params.uri), set()).discard(ctx.session)
        return types.EmptyResult()

    server = MCPServer("lora-trainer", instructions=INSTRUCTIONS, lifespan=lifespan, subscriptions=bus)
    # MCPServer has no decorator for the pre-2026 subscribe requests; its low-level server takes them
    # (registering them also advertises the resources.subscribe capability).
    server._lowlevel_server.add_request_handler("resources/subscribe", types.SubscribeRequestParams, subscribe)
    server._lowlevel_server.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, unsubscribe)
    read_only = ToolAnnotations(readOnlyHint=True, idempotentHint=True)

    # --- datasets (basic form; the dataset issue extends them) ---------------------------------
    @server.tool(
        name="upload-dataset",
        description="Save images (base64) with their captions into a dataset, creating it if needed. Each file "
        "is saved or refused on its own, with the reason; the result lists every file. Then create-training-config "
        "with dataset_path=<dataset_name>.",
    )
    def upload_dataset(
        dataset_name: str = Field(description="Dataset name: letters, digits, '.', '_' or '-'."),
        images: list[UploadImage] = Field(description="Up to 200 images: {filename, content (base64), caption}."),
        overwrite: bool = Field(False, description="Replace files that already exist."),
    ) -> UploadResult:
        return call(datasets.upload, dataset_name, images, overwrite)

    @server.tool(
        name="import-dataset",
        description="Bring a local folder into the workspace as a dataset: images with same-named .txt captions, "
        "kohya 'N_name' repeat folders, concept subfolders and a 'validation' folder. mode 'copy' copies the "
        "files; 'link' links to them where they are. The folder must be inside the workspace or a folder "
        "listed in LORA_MCP_ALLOWED_DIRS.",
    )
    def import_dataset(
        dataset_name: str = Field(description="Name for the dataset: letters, digits, '.', '_' or '-'."),
        source_path: str = Field(description="The folder to import (absolute path)."),
        mode: Literal["copy", "link"] = Field("copy", description="copy the files, or link to them."),
        overwrite: bool = Field(False, description="Import into an existing dataset, replacing same-named files."),
    ) -> ImportResult:
        result = call(datasets.import_folder, dataset_name, source_path, mode, overwrite)
        return _trimmed(result)

    @server.tool(
        name="update-captions",
        description="Change captions: edits {image filename: new caption}, and/or find + replace over every "
        "caption, and/or trigger_word to put it first in every caption that lacks it.",
    )
    def update_captions(
        dataset_name: str = Field(description="Dataset name, from list-datasets."),
        edits: dict[str, str] | None = Field(None, description="New captions by image path, e.g. {'a.png': '...'}."),
        find: str | None = Field(None, description="Text to replace in every caption (with replace)."),
        replace: str | None = Field(None, description="Replacement for find."),
        trigger_word: str | None = Field(None, description="Ensure every caption contains it, first if missing."),
    ) -> CaptionUpdateResult:
        return call(lambda: datasets.update_captions(dataset_name, edits, find, replace, trigger_word))

    @server.tool(
        name="delete-dataset",
        description="Delete a dataset of the workspace (for a linked import, only the links: the originals stay).",
        annotations=ToolAnnotations(destructiveHint=True),
    )
    def delete_dataset(dataset_name: str = Field(description="Dataset name, from list-datasets.")) -> Deleted:
        call(datasets.delete, dataset_name)
        return Deleted(name=dataset_name)

    @server.tool(
        name="get-dataset-info",
        description="Inspect a dataset before training: counts per concept (with repeats), resolutions, "
        "buckets, formats, missing or orphan captions, captions without their trigger word, near-duplicate, "
        "blurry, badly exposed or too small images, near-identical captions, and a verdict on the image count "
        "for the kind of LoRA. 'problems' lists what to fix.",
        annotations=read_only,
    )
    def get_dataset_info(
        dataset_name: str = Field(description="Dataset name, from list-datasets."),
        lora_type: LoraType = Field("style", description="What the LoRA teaches; sets the image-count verdict."),
        model_name: str | None = Field(
            None, description="Base model to size-check against (its native resolution); default SD 1.5's 512 px."
        ),
        trigger_word: str | None = Field(None, description="Trigger word for images at the dataset's root."),
    ) -> DatasetReport:
        return call(
            lambda: dataset_info(
                workspace, dataset_name, lora_type=lora_type, model_name=model_name, trigger_word=trigger_word
            )
        )

    @server.tool(
        name="generate-captions",
        description="Write captions for a dataset's images: caption_model 'template' (offline: trigger word + "
        "subject from the file or folder name + the guide's structure) or an image-to-text model (blip, blip2, git, "
        "a Hugging Face id in the local cache, or a local folder). Images that have a caption are kept unless "
        "overwrite. Progress is reported while it runs. Then lint-captions.",
    )
    async def generate_captions_tool(
        ctx: Context,
        dataset_name: str | None = Field(None, description="Dataset name, from list-datasets."),
        dataset_path: str | None = Field(None, description="Or a dataset folder (inside the allowed folders)."),
        caption_model: str = Field("template", description="template, blip, blip2, git, an HF id or a folder."),
        trigger_word: str | None = Field(None, description="Put first in every caption, e.g. 'xyz_style'."),
        overwrite: bool = Field(False, description="Replace existing captions too."),
        prefix: str = Field("", description="Text after the trigger word, before the description."),
        suffix: str = Field("", description="Text at the end, e.g. ', watercolor painting'."),
    ) -> CaptionRun:
        def progress(done: int, total: int) -> None:
            anyio.from_thread.run(ctx.report_progress, done, total, f"{done}/{total} images captioned")

        def run() -> CaptionRun:
            # Not under the job lock: captioning with a model can take minutes, status calls must not wait.
            try:
                return generate_captions(
                    workspace,
                    dataset_name=dataset_name,
                    dataset_path=dataset_path,
                    caption_model=caption_model,
                    trigger_word=trigger_word,
                    overwrite=overwrite,
                    prefix=prefix,
                    suffix=suffix,
                    on_progress=progress,
                )
            except ServiceError as exc:
                raise ToolError(str(exc)) from None

        return await anyio.to_thread.run_sync(run)

    @server.tool(
        name="lint-captions",
        description="Check every caption against the guide: trigger word first and not a generic word, the "
        "structure '[trigger] [subject] [details], [style], [quality], [composition]', the FLUX elements (camera "
        "angle, environment, lighting) for FLUX-class models, empty or duplicate captions, and captions longer "
        "than the model reads. Each finding names the file and a fix.",
        annotations=read_only,
    )
    def lint_captions_tool(
        dataset_name: str = Field(description="Dataset name, from list-datasets."),
        model_name: str | None = Field(None, description="Base model: counts tokens with its tokenizer."),
        trigger_word: str | None = Field(None, description="Trigger word for images at the dataset's root."),
        max_token_length: Literal[75, 150, 225] = Field(75, description="Tokens the training config reads."),
    ) -> CaptionLintResult:
        return call(
            lambda: caption_lint(
                workspace,
                dataset_name,
                model_name=model_name,
                trigger_word=trigger_word,
                max_token_length=max_token_length,
            )
        )

    @server.tool(
        name="list-datasets", description="Datasets in the workspace with image counts.", annotations=read_only
    )
    def list_datasets() -> DatasetList:
        return DatasetList(datasets=call(datasets.list))

    # --- configs -------------------------------------------------------------------------------
    def create_training_config(**values: Any) -> ConfigResult:
        given = {key: value for key, value in values.items() if value is not None}
        config = call(configs.create, given)
        return ConfigResult(
            name=config.name,
            config=config.model_dump(mode="json"),
            warnings=config.warnings(),
            next_step=f"validate-training-config name={config.name}, then start-training config_name={config.name}",
        )

    create_training_config.__signature__ = _config_signature()
    server.add_tool(
        create_training_config,
        name="create-training-config",
        description="Create a named training config. Give name, model_name (e.g. runwayml/stable-diffusion-v1-5 or "
        "builtin:tiny-sd15), dataset_path (a dataset name from list-datasets or a folder path), trigger_word and "
        "test_prompts; every other option has the guide's default (learning_rate 2e-4, rank 32, steps 100 x images).",
    )

    @server.tool(name="list-configs", description="List saved training configs.", annotations=read_only)
    def list_configs() -> ConfigList:
        return ConfigList(configs=call(configs.list))

    @server.tool(name="get-config", description="Show one config with every option.", annotations=read_only)
    def get_config(name: str = Field(description="Config name, from list-configs.")) -> ConfigResult:
        config = call(configs.get, name)
        return ConfigResult(
            name=name, config=config.model_dump(mode="json"), warnings=config.warnings(), next_step="start-training"
        )

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
        return ConfigResult(
            name=name,
            config=config.model_dump(mode="json"),
            warnings=config.warnings(),
            next_step=f"validate-training-config name={name}",
        )

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
    def get_training_status(job_id: str = Field(description="Job id from start-training.")) -> JobStatus:
        return call(jobs.status, job_id)

    @server.tool(
        name="get-training-logs",
        description="The last lines of a job's training log (and of its process output).",
        annotations=read_only,
    )
    def get_training_logs(
        job_id: str = Field(description="Job id from start-training."),
        lines: int = Field(50, ge=1, le=1000, description="How many lines from the end."),
    ) -> str:
        return call(jobs.logs, job_id, lines)

    @server.tool(
        name="stop-training",
        description="Stop a job gracefully: it finishes its step, saves a checkpoint and ends as 'stopped' "
        "(killed if it has not ended after 60 s). resume-training continues it later.",
        annotations=ToolAnnotations(destructiveHint=False, idempotentHint=False),
    )
    def stop_training(job_id: str = Field(description="Job id from start-training.")) -> JobStatus:
        call(jobs.stop, job_id)
        return call(jobs.status, job_id)

    @server.tool(
        name="resume-training",
        description="Continue a stopped, interrupted or failed job from its last checkpoint (same job_id).",
    )
    def resume_training(job_id: str = Field(description="Job id from start-training.")) -> JobStatus:
        call(jobs.resume, job_id)
        return call(jobs.status, job_id)

    @server.tool(name="list-training-jobs", description="Every job with its state and progress.", annotations=read_only)
    def list_training_jobs() -> JobList:
        return JobList(jobs=call(jobs.list))

    @server.tool(
        name="get-training-samples",
        description="The sample images a job rendered for its test prompts (step 0 is the untrained baseline), "
        "as images with their prompt and step. Without step: the latest samples.",
        annotations=read_only,
    )
    def get_training_samples(
        job_id: str = Field(description="Job id from start-training."),
        step: int | None = Field(None, ge=0, description="A sampling step; default: the latest."),
    ) -> list:
        status = call(jobs.status, job_id)
        return _sample_content(Path(status.run_dir), job_id, step)

    # --- LoRA files and the machine --------------------------------------------------------------
    @server.tool(
        name="list-exported-models", description="LoRA files in the workspace's loras/ folder.", annotations=read_only
    )
    def list_exported_models() -> LoraList:
        return LoraList(loras=call(loras.list))

    @server.tool(
        name="export-model",
        description="Copy a job's LoRA (the final one, or a checkpoint's with step) into loras/ with a metadata "
        "sidecar, ready for ComfyUI (models/loras) or A1111 (models/Lora).",
    )
    def export_model(
        job_id: str = Field(description="Job id from start-training."),
        step: int | None = Field(None, ge=1, description="A checkpoint step; default: the final LoRA."),
        output_format: Literal["kohya", "diffusers"] = Field("kohya", description="kohya for ComfyUI/A1111."),
    ) -> ExportedLora:
        status = call(jobs.status, job_id)
        return call(loras.export, job_id, Path(status.run_dir), status.config_name, step, output_format)

    @server.tool(
        name="download-model",
        description="Read a file in pieces as base64: an exported LoRA ('name.safetensors') or a run file "
        "('<job_id>/<file>'). Call again with next_offset until eof is true.",
        annotations=read_only,
    )
    def download_model(
        path: str = Field(description="'name.safetensors' in loras/, or '<job_id>/<file>' in a job's run directory."),
        offset: int = Field(0, ge=0, description="Byte offset to start at."),
        length: int = Field(DEFAULT_CHUNK, ge=1, le=MAX_CHUNK, description="Bytes to read (at most 720 KiB)."),
    ) -> Chunk:
        run_dirs = {job.job_id: Path(job.run_dir) for job in call(jobs.list)}
        return call(loras.read_chunk, path, offset, length, run_dirs)

    @server.tool(
        name="upload-lora-chunked-start",
        description="Begin uploading a LoRA file too large for one call: give a new upload_id (e.g. a uuid4), the "
        "filename (.safetensors), total_size in bytes, optional metadata {trigger_words, base_model} and sha256. "
        "Then send the file with upload-lora-chunked-append in chunk_size pieces (any order), then finish.",
    )
    def upload_lora_chunked_start(
        upload_id: str = Field(description="Your id for this upload, e.g. a uuid4."),
        filename: str = Field(description="Name of the LoRA file, ending in .safetensors."),
        total_size: int = Field(ge=1, description="File size in bytes."),
        metadata: dict[str, Any] | None = Field(None, description="Optional: trigger_words (list), base_model."),
        chunk_size: int = Field(DEFAULT_CHUNK_SIZE, description="Bytes per chunk (default 262144)."),
        sha256: str | None = Field(None, description="Optional hex sha256 of the whole file, checked at finish."),
    ) -> UploadStarted:
        return call(lambda: uploads.start(upload_id, filename, total_size, metadata, chunk_size, sha256))

    @server.tool(
        name="upload-lora-chunked-append",
        description="Send one chunk: its bytes as base64 and its chunk_index (offset = chunk_index x chunk_size). "
        "Chunks may come in any order and may be re-sent.",
    )
    def upload_lora_chunked_append(
        upload_id: str = Field(description="The id given to upload-lora-chunked-start."),
        chunk: str = Field(description="The chunk's bytes, base64-encoded."),
        chunk_index: int = Field(ge=0, description="Which chunk this is, from 0."),
    ) -> ChunkReceived:
        return call(uploads.append, upload_id, chunk, chunk_index)

    @server.tool(
        name="upload-lora-chunked-finish",
        description="Check that every chunk arrived (size, sha256, a valid safetensors file) and move the LoRA "
        "into loras/ with its metadata; list-exported-models then shows it.",
    )
    def upload_lora_chunked_finish(
        upload_id: str = Field(description="The id given to upload-lora-chunked-start."),
    ) -> UploadFinished:
        return call(uploads.finish, upload_id)

    @server.tool(
        name="get-system-stats",
        description="GPU name and memory (when torch sees one), RAM, free disk in the workspace, and how many "
        "jobs are running and queued.",
        annotations=read_only,
    )
    def get_system_stats() -> SystemStats:
        return system_stats(workspace, call(jobs.list))

    # --- resources -----------------------------------------------------------------------------
    @server.resource("lora://datasets/{name}", mime_type="application/json", description="A dataset's report.")
    def dataset_resource(name: str) -> str:
        return resource_call(lambda: dataset_info(workspace, name)).model_dump_json(indent=2)

    @server.resource(
        "lora://datasets/{name}/images/{filename}", mime_type="image/png", description="A thumbnail of an image."
    )
    def dataset_image_resource(name: str, filename: str) -> bytes:
        folder = workspace / "datasets" / resource_call(checked_name, "dataset", name)
        path = folder / filename
        if (
            "/" in filename
            or filename.startswith(".")
            or path.suffix.lower() not in IMAGE_SUFFIXES
            or not path.is_file()
        ):
            raise ResourceNotFoundError(f"dataset {name!r} has no image {filename!r}; get-dataset-info lists them")
        return _thumbnail_png(path)

    @server.resource("lora://configs/{name}", mime_type="application/yaml", description="A saved config (YAML).")
    def config_resource(name: str) -> str:
        return resource_call(configs.get_yaml, name)

    @server.resource("lora://jobs/{job_id}/status", mime_type="application/json", description="A job's status.")
    def status_resource(job_id: str) -> str:
        return resource_call(jobs.status, job_id).model_dump_json(indent=2)

    @server.resource("lora://jobs/{job_id}/log", mime_type="text/plain", description="The last 200 log lines.")
    def log_resource(job_id: str) -> str:
        return resource_call(jobs.logs, job_id, 200)

    @server.resource("lora://jobs/{job_id}/metrics", mime_type="text/csv", description="Per-step metrics (CSV).")
    def metrics_resource(job_id: str) -> str:
        rows = _metric_rows(Path(resource_call(jobs.status, job_id).run_dir))
        columns = ["step", "loss", "lr", "grad_norm", "step_time", "time"]
        lines = [",".join(columns)] + [
            ",".join("" if r.get(c) is None else str(r.get(c)) for c in columns) for r in rows
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
        from server.plots import loss_curve_png  # Pillow only when a curve is asked for: start-up stays light

        return loss_curve_png(_metric_rows(Path(resource_call(jobs.status, job_id).run_dir)))

    # --- prompts -------------------------------------------------------------------------------
    @server.prompt(
        name="train-lora",
        description="Walk through training a LoRA: dataset, captions, config, start, monitor, use.",
    )
    def train_lora(
        goal: str = Field(description="What the LoRA should learn, e.g. 'a watercolor style' or 'my dog Rex'."),
        dataset: str = Field("", description="A dataset name or folder, if there is one already."),
    ) -> str:
        return TRAIN_LORA_PROMPT.format(goal=goal, dataset=dataset or "(not chosen yet)")

    return server


TRAIN_LORA_PROMPT = """Help me train a LoRA for: {goal}. Dataset: {dataset}.
Work through these steps with the lora-trainer tools, telling me what you find at each one:
1. Dataset: list-datasets, or upload-dataset the images I give you (each image with a same-named caption).
   The guide's sizes: style 10-50 images, character/person 20-100, object/concept 15-50, complex style 50-200.
2. Captions: each caption starts with a unique trigger word (like xyz_style, never a plain word such as
   'style'), then the subject, details, style, quality and composition.
3. Config: create-training-config with name, model_name, dataset_path, trigger_word and 3-4 test_prompts that
   start with the trigger word. Defaults follow the guide: learning_rate 2e-4, rank 32 (16 for simple styles),
   alpha = rank, steps = 100 x images. Then validate-training-config and fix every error it reports.
4. Train: start-training, then get-training-status every minute or two (never wait inside a call);
   get-training-samples shows the test prompts as the LoRA learns (step 0 is the untrained baseline).
   Loss should fall, usually to 0.05-0.15; samples should move towards the dataset without copying it.
5. Finish: when the state is completed, export-model and tell me the file, the trigger word and a strength
   to start from (style 0.6-1.0, character 0.7-0.9) for ComfyUI's LoraLoader or A1111.
If a job fails or is interrupted, read get-training-logs, explain the cause, and offer resume-training."""


def _metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line of a killed trainer
    return rows


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


MAX_LISTED_FILES = 300  # per-file outcomes in one result: thousands would pass the ~1 MB result cap


def _trimmed(result: ImportResult) -> ImportResult:
    """Every refusal, and imported files up to MAX_LISTED_FILES in all."""
    if len(result.files) <= MAX_LISTED_FILES:
        return result
    refused = [f for f in result.files if not f.saved]
    saved = [f for f in result.files if f.saved]
    kept = refused + saved[: max(0, MAX_LISTED_FILES - len(refused))]
    hidden = len(result.files) - len(kept)
    return result.model_copy(
        update={"files": kept, "next_step": f"{result.next_step} ({hidden} imported files not listed)"}
    )


def _thumbnail_png(path: Path) -> bytes:
    """An image scaled to at most SAMPLE_MAX_SIDE, as PNG bytes."""
    from PIL import Image as PILImage

    with PILImage.open(path) as image:
        image.thumbnail((SAMPLE_MAX_SIDE, SAMPLE_MAX_SIDE))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _sample_content(run_dir: Path, job_id: str, step: int | None) -> list:
    index = run_dir / "samples" / "index.jsonl"
    rows = []
    if index.exists():
        for line in index.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    if not rows:
        raise ToolError(f"job {job_id} has no samples yet (samples need test_prompts and sampling enabled)")
    steps = sorted({row["step"] for row in rows})
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise ToolError(f"job {job_id} has samples at steps {steps}; ask for one of them")
    content: list = []
    for row in (r for r in rows if r["step"] == chosen):
        content.append(f"step {chosen}, prompt {row['prompt_index']}: {row['prompt']}")
        content.append(Image(data=_thumbnail_png(run_dir / "samples" / row["file"]), format="png"))
    return content
