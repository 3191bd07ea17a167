"""Dataset tools and resources: upload, import, inspect, caption, lint, edit, delete."""

from __future__ import annotations

import json
from typing import Literal

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

from server.captions import (
    INLINE_MODEL_IMAGES,
    CaptionRun,
    caption_job_started,
    caption_now,
    plan_captions,
    runs_in_background,
)
from server.datasets import CaptionUpdateResult, DatasetSummary, ImportResult, UploadImage, UploadResult
from server.errors import ServiceError
from server.images import thumbnail_png
from server.inspection import CaptionLintResult, caption_lint, dataset_info
from server.names import checked_name, plain_filename_problem
from server.paths import set_client_roots
from server.tools import READ_ONLY, Deleted, Services
from training.config import LoraType
from training.data.dataset import IMAGE_SUFFIXES
from training.data.report import DatasetReport


async def refresh_client_roots(ctx: Context) -> None:
    """Ask the client for its roots, where it offers them (clients before the 2026-07-28 protocol)."""
    import warnings

    from mcp import types

    session = ctx.session
    if not session.check_client_capability(types.ClientCapabilities(roots=types.RootsCapability())):
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # roots are deprecated in 2026-07-28, still how older clients say it
            result = await session.list_roots()
    except Exception:  # a client that declared roots but cannot answer: the configured folders still apply
        return
    set_client_roots([str(root.uri) for root in result.roots])


MAX_LISTED_FILES = 300  # per-file outcomes in one result: thousands would pass the ~1 MB result cap


class DatasetList(BaseModel):
    datasets: list[DatasetSummary]


def register_dataset_tools(server: MCPServer, s: Services) -> None:
    call, resource_call, workspace, datasets, jobs = s.call, s.resource_call, s.workspace, s.datasets, s.jobs
    read_only = READ_ONLY

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
    async def import_dataset(
        ctx: Context,
        dataset_name: str = Field(description="Name for the dataset: letters, digits, '.', '_' or '-'."),
        source_path: str = Field(description="The folder to import (absolute path)."),
        mode: Literal["copy", "link"] = Field("copy", description="copy the files, or link to them."),
        overwrite: bool = Field(False, description="Import into an existing dataset, replacing same-named files."),
    ) -> ImportResult:
        await refresh_client_roots(ctx)
        result = await anyio.to_thread.run_sync(
            lambda: call(datasets.import_folder, dataset_name, source_path, mode, overwrite)
        )
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
        "overwrite. A quick set is captioned inside the call, with progress; a model with more than "
        f"{INLINE_MODEL_IMAGES} images to caption runs as a background job: the result's job_id works with "
        "get-training-status, get-training-logs and stop-training. Then lint-captions.",
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
        background: bool | None = Field(
            None,
            description="true: always a background job; false: always inside this call; default: a job when a "
            f"model has more than {INLINE_MODEL_IMAGES} images to caption.",
        ),
    ) -> CaptionRun:
        await refresh_client_roots(ctx)

        def progress(done: int, total: int) -> None:
            anyio.from_thread.run(ctx.report_progress, done, total, f"{done}/{total} images captioned")

        def run() -> CaptionRun:
            # Not under the job lock: listing a large folder or captioning with a model takes a while,
            # and status calls must not wait for it.
            try:
                plan = plan_captions(
                    workspace,
                    dataset_name=dataset_name,
                    dataset_path=dataset_path,
                    caption_model=caption_model,
                    trigger_word=trigger_word,
                    overwrite=overwrite,
                    prefix=prefix,
                    suffix=suffix,
                )
                if runs_in_background(plan, background):
                    record = call(jobs.start_captioning, plan.label, json.dumps(plan.job))
                    return caption_job_started(plan, caption_model, record.job_id)
                return caption_now(plan, caption_model, on_progress=progress)
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
            plain_filename_problem(filename)
            or path.suffix.lower() not in IMAGE_SUFFIXES
            or not path.is_file()
        ):
            raise ResourceNotFoundError(f"dataset {name!r} has no image {filename!r}; get-dataset-info lists them")
        return thumbnail_png(path)


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
