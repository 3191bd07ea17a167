"""Dataset tools and resources: upload, import, inspect, caption, lint, edit, delete."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

from server.captions import INLINE_MODEL_IMAGES, CaptionRun, caption_or_queue
from server.dataset_schemas import (
    CaptionLintRequest,
    CaptionUpdateResult,
    DatasetQuery,
    DatasetSummary,
    ImportResult,
    UploadImage,
    UploadResult,
)
from server.errors import ServiceError
from server.images import thumbnail_png
from server.inspection import CaptionLintResult, caption_lint, dataset_info
from server.names import checked_name, plain_filename_problem
from server.paths import set_client_roots
from server.tools import READ_ONLY, Deleted, Services
from server.tools.arguments import request_parameters, request_tool
from training.captioning import CaptionRequest
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


class DatasetTools:
    """Datasets in the workspace: upload, import, edit captions, delete, list."""

    def __init__(self, s: Services):
        self.s = s

    def upload_dataset(
        self,
        dataset_name: str = Field(description="Dataset name: letters, digits, '.', '_' or '-'."),
        images: list[UploadImage] = Field(description="Up to 200 images: {filename, content (base64), caption}."),
        overwrite: bool = Field(False, description="Replace files that already exist."),
    ) -> UploadResult:
        return self.s.call(self.s.datasets.upload, dataset_name, images, overwrite)

    async def import_dataset(
        self,
        ctx: Context,
        dataset_name: str = Field(description="Name for the dataset: letters, digits, '.', '_' or '-'."),
        source_path: str = Field(description="The folder to import (absolute path)."),
        mode: Literal["copy", "link"] = Field("copy", description="copy the files, or link to them."),
        overwrite: bool = Field(False, description="Import into an existing dataset, replacing same-named files."),
    ) -> ImportResult:
        await refresh_client_roots(ctx)
        result = await anyio.to_thread.run_sync(
            lambda: self.s.call(self.s.datasets.import_folder, dataset_name, source_path, mode, overwrite)
        )
        return _trimmed(result)

    def update_captions(
        self,
        dataset_name: str = Field(description="Dataset name, from list-datasets."),
        edits: dict[str, str] | None = Field(None, description="New captions by image path, e.g. {'a.png': '...'}."),
        find: str | None = Field(None, description="Text to replace in every caption (with replace)."),
        replace: str | None = Field(None, description="Replacement for find."),
        trigger_word: str | None = Field(None, description="Ensure every caption contains it, first if missing."),
    ) -> CaptionUpdateResult:
        return self.s.call(self.s.datasets.update_captions, dataset_name, edits, find, replace, trigger_word)

    def delete_dataset(self, dataset_name: str = Field(description="Dataset name, from list-datasets.")) -> Deleted:
        self.s.call(self.s.datasets.delete, dataset_name)
        return Deleted(name=dataset_name)

    def list_datasets(self) -> DatasetList:
        return DatasetList(datasets=self.s.call(self.s.datasets.list))


class DatasetChecks:
    """What a dataset holds and what its captions get wrong: get-dataset-info, lint-captions, and the
    dataset resources."""

    def __init__(self, s: Services):
        self.s = s

    # server/inspection.py takes the requests' fields as keywords; the requests are their only declaration.
    def get_dataset_info(self, query: DatasetQuery) -> DatasetReport:
        options = query.model_dump(exclude={"dataset_name"})
        return self.s.call(lambda: dataset_info(self.s.workspace, query.dataset_name, **options))

    def lint_captions(self, request: CaptionLintRequest) -> CaptionLintResult:
        options = request.model_dump(exclude={"dataset_name"})
        return self.s.call(lambda: caption_lint(self.s.workspace, request.dataset_name, **options))

    def dataset_resource(self, name: str) -> str:
        return self.s.resource_call(dataset_info, self.s.workspace, name).model_dump_json(indent=2)

    def dataset_image_resource(self, name: str, filename: str) -> bytes:
        folder = self.s.workspace / "datasets" / self.s.resource_call(checked_name, "dataset", name)
        path = folder / filename
        if (
            plain_filename_problem(filename)
            or path.suffix.lower() not in IMAGE_SUFFIXES
            or not path.is_file()
        ):
            raise ResourceNotFoundError(f"dataset {name!r} has no image {filename!r}; get-dataset-info lists them")
        return thumbnail_png(path)


def generate_captions_tool(s: Services) -> Callable[..., Any]:
    """generate-captions, its arguments CaptionRequest's fields: an async tool, so that it can ask the client
    for its roots and report progress, which request_tool's plain functions cannot."""

    async def generate_captions_tool(ctx: Context, background: bool | None = None, **request: Any) -> CaptionRun:
        await refresh_client_roots(ctx)

        def progress(done: int, total: int) -> None:
            anyio.from_thread.run(ctx.report_progress, done, total, f"{done}/{total} images captioned")

        def run() -> CaptionRun:
            # In a worker thread, and only the job's start under the services' lock: listing a large folder
            # or captioning with a model takes a while, and status calls must not wait for it.
            start_job = partial(s.call, s.jobs.start_captioning)
            try:
                return caption_or_queue(s.workspace, background, start_job, progress, **request)
            except ServiceError as exc:
                raise ToolError(str(exc)) from None

        return await anyio.to_thread.run_sync(run)

    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Context)
    background = inspect.Parameter(
        "background",
        inspect.Parameter.KEYWORD_ONLY,
        default=Field(
            None,
            description="true: always a background job; false: always inside this call; default: a job when a "
            f"model has more than {INLINE_MODEL_IMAGES} images to caption.",
        ),
        annotation=bool | None,
    )
    generate_captions_tool.__signature__ = inspect.Signature(
        [context, *request_parameters(CaptionRequest), background], return_annotation=CaptionRun
    )
    return generate_captions_tool


def register_dataset_tools(server: MCPServer, s: Services) -> None:
    tools, checks = DatasetTools(s), DatasetChecks(s)
    server.add_tool(
        tools.upload_dataset,
        name="upload-dataset",
        description="Save images (base64) with their captions into a dataset, creating it if needed. Each file "
        "is saved or refused on its own, with the reason; the result lists every file. Then create-training-config "
        "with dataset_path=<dataset_name>.",
    )
    server.add_tool(
        tools.import_dataset,
        name="import-dataset",
        description="Bring a local folder into the workspace as a dataset: images with same-named .txt captions, "
        "kohya 'N_name' repeat folders, concept subfolders and a 'validation' folder. mode 'copy' copies the "
        "files; 'link' links to them where they are. The folder must be inside the workspace or a folder "
        "listed in LORA_MCP_ALLOWED_DIRS.",
    )
    server.add_tool(
        tools.update_captions,
        name="update-captions",
        description="Change captions: edits {image filename: new caption}, and/or find + replace over every "
        "caption, and/or trigger_word to put it first in every caption that lacks it.",
    )
    server.add_tool(
        tools.delete_dataset,
        name="delete-dataset",
        description="Delete a dataset of the workspace (for a linked import, only the links: the originals stay).",
        annotations=ToolAnnotations(destructiveHint=True),
    )
    server.add_tool(
        request_tool(DatasetQuery, checks.get_dataset_info, function_name="get_dataset_info", returns=DatasetReport),
        name="get-dataset-info",
        description="Inspect a dataset before training: counts per concept (with repeats), resolutions, "
        "buckets, formats, missing or orphan captions, captions without their trigger word, near-duplicate, "
        "blurry, badly exposed or too small images, near-identical captions, and a verdict on the image count "
        "for the kind of LoRA. 'problems' lists what to fix.",
        annotations=READ_ONLY,
    )
    server.add_tool(
        generate_captions_tool(s),
        name="generate-captions",
        description="Write captions for a dataset's images: caption_model 'template' (offline: trigger word + "
        "subject from the file or folder name + the guide's structure) or an image-to-text model (blip, blip2, git, "
        "a Hugging Face id in the local cache, or a local folder). Images that have a caption are kept unless "
        "overwrite. A quick set is captioned inside the call, with progress; a model with more than "
        f"{INLINE_MODEL_IMAGES} images to caption runs as a background job: the result's job_id works with "
        "get-training-status, get-training-logs and stop-training. Then lint-captions.",
    )
    server.add_tool(
        request_tool(
            CaptionLintRequest, checks.lint_captions, function_name="lint_captions_tool", returns=CaptionLintResult
        ),
        name="lint-captions",
        description="Check every caption against the guide: trigger word first and not a generic word, the "
        "structure '[trigger] [subject] [details], [style], [quality], [composition]', the FLUX elements (camera "
        "angle, environment, lighting) for FLUX-class models, empty or duplicate captions, and captions longer "
        "than the model reads. Each finding names the file and a fix.",
        annotations=READ_ONLY,
    )
    server.add_tool(
        tools.list_datasets,
        name="list-datasets",
        description="Datasets in the workspace with image counts.",
        annotations=READ_ONLY,
    )
    server.resource("lora://datasets/{name}", mime_type="application/json", description="A dataset's report.")(
        checks.dataset_resource
    )
    server.resource(
        "lora://datasets/{name}/images/{filename}", mime_type="image/png", description="A thumbnail of an image."
    )(checks.dataset_image_resource)


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
