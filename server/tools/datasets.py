"""Dataset tools and resources: upload, import, inspect, caption, lint, edit, delete."""

from __future__ import annotations

import inspect
from functools import partial
from typing import Literal

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
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
from server.inspection import CaptionLintResult, caption_lint, dataset_image, dataset_info
from server.paths import set_client_roots
from server.service_calls import tool_error
from server.tools import READ_ONLY, Deleted, Services, add_tools, resource, tool
from training.captioning import CaptionRequest
from training.data.report import DatasetReport


async def refresh_client_roots(ctx: Context, services: Services) -> None:
    """Ask the client for its roots, where it offers them (clients before the 2026-07-28 protocol) and the
    server takes them: over HTTP a client's roots are folders of another machine, and a remote client must
    not widen what the server may read."""
    import warnings

    from mcp import types

    if not services.client_roots or not in_request(ctx):
        return
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


def in_request(ctx: Context) -> bool:
    """Whether the call came with an MCP request (a session to report progress to): a call through the
    HTTP JSON API has none."""
    try:
        ctx.request_context
    except ValueError:
        return False
    return True


MAX_LISTED_FILES = 300  # per-file outcomes in one result: thousands would pass the ~1 MB result cap


class DatasetList(BaseModel):
    datasets: list[DatasetSummary]


# generate-captions' knob that is the server's, not the request's; the request Context (for client roots
# and progress) is passed the same way.
CAPTION_BACKGROUND = inspect.Parameter(
    "background",
    inspect.Parameter.KEYWORD_ONLY,
    default=Field(
        None,
        description="true: always a background job; false: always inside this call; default: a job when a "
        f"model has more than {INLINE_MODEL_IMAGES} images to caption.",
    ),
    annotation=bool | None,
)
REQUEST_CONTEXT = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=Context)


class DatasetTools:
    """Datasets in the workspace: upload, import, edit captions, delete, inspect, caption, lint, list; and
    the dataset resources. Methods stand in the order a client lists the tools."""

    def __init__(self, s: Services):
        self.s = s

    @tool(
        "upload-dataset",
        "Save images (base64) with their captions into a dataset, creating it if needed. Each file "
        "is saved or refused on its own, with the reason; the result lists every file. Then create-training-config "
        "with dataset_path=<dataset_name>.",
    )
    def upload_dataset(
        self,
        dataset_name: str = Field(description="Dataset name: letters, digits, '.', '_' or '-'."),
        images: list[UploadImage] = Field(description="Up to 200 images: {filename, content (base64), caption}."),
        overwrite: bool = Field(False, description="Replace files that already exist."),
    ) -> UploadResult:
        return self.s.call(self.s.datasets.upload, dataset_name, images, overwrite)

    @tool(
        "import-dataset",
        "Bring a local folder into the workspace as a dataset: images with same-named .txt captions, "
        "kohya 'N_name' repeat folders, concept subfolders and a 'validation' folder. mode 'copy' copies the "
        "files; 'link' links to them where they are. The folder must be inside the workspace or a folder "
        "listed in LORA_MCP_ALLOWED_DIRS.",
    )
    async def import_dataset(
        self,
        ctx: Context,
        dataset_name: str = Field(description="Name for the dataset: letters, digits, '.', '_' or '-'."),
        source_path: str = Field(description="The folder to import (absolute path)."),
        mode: Literal["copy", "link"] = Field("copy", description="copy the files, or link to them."),
        overwrite: bool = Field(False, description="Import into an existing dataset, replacing same-named files."),
    ) -> ImportResult:
        await refresh_client_roots(ctx, self.s)
        result = await anyio.to_thread.run_sync(
            lambda: self.s.call(self.s.datasets.import_folder, dataset_name, source_path, mode, overwrite)
        )
        return _trimmed(result)

    @tool(
        "update-captions",
        "Change captions: edits {image filename: new caption}, and/or find + replace over every "
        "caption, and/or trigger_word to put it first in every caption that lacks it.",
    )
    def update_captions(
        self,
        dataset_name: str = Field(description="Dataset name, from list-datasets."),
        edits: dict[str, str] | None = Field(None, description="New captions by image path, e.g. {'a.png': '...'}."),
        find: str | None = Field(None, description="Text to replace in every caption (with replace)."),
        replace: str | None = Field(None, description="Replacement for find."),
        trigger_word: str | None = Field(None, description="Ensure every caption contains it, first if missing."),
    ) -> CaptionUpdateResult:
        return self.s.call(self.s.datasets.update_captions, dataset_name, edits, find, replace, trigger_word)

    @tool(
        "delete-dataset",
        "Delete a dataset of the workspace (for a linked import, only the links: the originals stay).",
        ToolAnnotations(destructiveHint=True),
    )
    def delete_dataset(self, dataset_name: str = Field(description="Dataset name, from list-datasets.")) -> Deleted:
        self.s.call(self.s.datasets.delete, dataset_name)
        return Deleted(name=dataset_name)

    # server/inspection.py takes the requests' fields as keywords; the requests are their only declaration.
    @tool(
        "get-dataset-info",
        "Inspect a dataset before training: counts per concept (with repeats), resolutions, "
        "buckets, formats, missing or orphan captions, captions without their trigger word, near-duplicate, "
        "blurry, badly exposed or too small images, near-identical captions, and a verdict on the image count "
        "for the kind of LoRA. 'problems' lists what to fix.",
        READ_ONLY,
        request=DatasetQuery,
    )
    def get_dataset_info(self, query: DatasetQuery) -> DatasetReport:
        options = query.model_dump(exclude={"dataset_name"})
        return self.s.call(lambda: dataset_info(self.s.workspace, query.dataset_name, **options))

    @tool(
        "generate-captions",
        "Write captions for a dataset's images: caption_model 'template' (offline: trigger word + "
        "subject from the file or folder name + the guide's structure) or a captioning model: blip or git (a "
        "short sentence, quick), blip2 (better sentences, 3.9B parameters, wants a GPU), florence2 (a detailed "
        "description, the usual choice for photos and styles), wd14 (Danbooru tags, for anime and illustration), "
        "or an image-text-to-text chat model such as JoyCaption or Qwen2.5-VL, asked caption_prompt (a Hugging "
        "Face id in the local cache, or a local folder). The trigger word goes first in every caption. "
        "Images that have a caption are kept unless "
        "overwrite. A quick set is captioned inside the call, with progress; a model with more than "
        f"{INLINE_MODEL_IMAGES} images to caption runs as a background job: the result's job_id works with "
        "get-training-status, get-training-logs and stop-training. Then lint-captions.",
        request=CaptionRequest,
        extra=[REQUEST_CONTEXT, CAPTION_BACKGROUND],
    )
    async def generate_captions_tool(
        self, request: CaptionRequest, ctx: Context, background: bool | None
    ) -> CaptionRun:
        """Async, so that it can ask the client for its roots and report progress."""
        await refresh_client_roots(ctx, self.s)

        def progress(done: int, total: int) -> None:
            if in_request(ctx):
                anyio.from_thread.run(ctx.report_progress, done, total, f"{done}/{total} images captioned")

        def run() -> CaptionRun:
            # In a worker thread: listing a large folder or captioning with a model takes a while, and
            # other calls (status polls) must not wait for it.
            start_job = partial(self.s.call, self.s.jobs.start_captioning)
            try:
                return caption_or_queue(
                    self.s.workspace, background, start_job, progress, **request.model_dump(exclude_unset=True)
                )
            except ServiceError as exc:
                raise tool_error(exc) from None

        return await anyio.to_thread.run_sync(run)

    @tool(
        "lint-captions",
        "Check every caption against the guide: trigger word first and not a generic word, the "
        "structure '[trigger] [subject] [details], [style], [quality], [composition]', the FLUX elements (camera "
        "angle, environment, lighting) for FLUX-class models, empty or duplicate captions, and captions longer "
        "than the model reads. Each finding names the file and a fix.",
        READ_ONLY,
        request=CaptionLintRequest,
    )
    def lint_captions_tool(self, request: CaptionLintRequest) -> CaptionLintResult:
        options = request.model_dump(exclude={"dataset_name"})
        return self.s.call(lambda: caption_lint(self.s.workspace, request.dataset_name, **options))

    @tool("list-datasets", "Datasets in the workspace with image counts.", READ_ONLY)
    def list_datasets(self) -> DatasetList:
        return DatasetList(datasets=self.s.call(self.s.datasets.list))

    @resource("lora://datasets/{name}", "application/json", "A dataset's report.")
    def dataset_resource(self, name: str) -> str:
        return self.s.resource_call(dataset_info, self.s.workspace, name).model_dump_json(indent=2)

    @resource("lora://datasets/{name}/images/{filename}", "image/png", "A thumbnail of an image.")
    def dataset_image_resource(self, name: str, filename: str) -> bytes:
        return self._thumbnail(name, [filename])

    @resource(
        "lora://datasets/{name}/images/{folder}/{filename}",
        "image/png",
        "A thumbnail of an image in a folder of the dataset (e.g. 10_cat/a.png).",
    )
    def dataset_folder_image_resource(self, name: str, folder: str, filename: str) -> bytes:
        return self._thumbnail(name, [folder, filename])

    def _thumbnail(self, name: str, parts: list[str]) -> bytes:
        """The thumbnail of the image at `parts` ([name] or [folder, name]) in the dataset `name`."""
        path = self.s.resource_call(dataset_image, self.s.workspace, name, parts)
        return thumbnail_png(path)


def register_dataset_tools(server: MCPServer, s: Services) -> None:
    add_tools(server, DatasetTools(s))


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
