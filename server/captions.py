"""generate-captions: captions for a dataset's images, by template or by an image-to-text model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, Field

from server.errors import ServiceError
from server.names import checked_name
from server.paths import check_user_path
from training.data.dataset import image_files
from training.workspace import atomic_write_text

BATCH = 8  # images per model call: progress is reported after each


class CaptionedFile(BaseModel):
    file: str
    caption: str


class CaptionRun(BaseModel):
    dataset: str = Field(description="The dataset folder.")
    caption_model: str
    captioned: int = Field(description="Captions written.")
    kept: int = Field(description="Images that already had a caption and were left alone (overwrite=false).")
    files: list[CaptionedFile] = Field(description="The captions written (at most 100 listed).")
    next_step: str


def generate_captions(
    workspace: Path,
    *,
    dataset_name: str | None,
    dataset_path: str | None,
    caption_model: str,
    trigger_word: str | None,
    overwrite: bool,
    prefix: str,
    suffix: str,
    on_progress: Callable[[int, int], None] | None = None,
) -> CaptionRun:
    from training.captioning import CaptionerUnavailable, compose, load_captioner, template_caption

    folder = _dataset_folder(workspace, dataset_name, dataset_path)
    images = image_files(folder, recursive=True)
    if not images:
        raise ServiceError(f"{folder} has no images (jpg, jpeg, png, webp) to caption")
    todo = [p for p in images if overwrite or not p.with_suffix(".txt").is_file()]
    if not todo:
        return CaptionRun(
            dataset=str(folder),
            caption_model=caption_model,
            captioned=0,
            kept=len(images),
            files=[],
            next_step="every image already has a caption: pass overwrite=true to replace them, or lint-captions",
        )
    if caption_model == "template":

        def describe(paths: list[Path]) -> list[str]:
            return [template_caption(p, folder) for p in paths]
    else:
        try:
            describe = load_captioner(caption_model)
        except CaptionerUnavailable as exc:
            raise ServiceError(str(exc)) from None

    written = []
    for first in range(0, len(todo), BATCH):
        batch = todo[first : first + BATCH]
        for path, description in zip(batch, describe(batch)):
            caption = compose(description, trigger_word=trigger_word, prefix=prefix, suffix=suffix)
            atomic_write_text(path.with_suffix(".txt"), caption + "\n")
            written.append(CaptionedFile(file=str(path.relative_to(folder)), caption=caption))
        if on_progress:
            on_progress(min(first + BATCH, len(todo)), len(todo))
    return CaptionRun(
        dataset=str(folder),
        caption_model=caption_model,
        captioned=len(written),
        kept=len(images) - len(todo),
        files=written[:100],
        next_step="read a few captions, refine them with update-captions, then lint-captions",
    )


def _dataset_folder(workspace: Path, dataset_name: str | None, dataset_path: str | None) -> Path:
    if (dataset_name is None) == (dataset_path is None):
        raise ServiceError("give either dataset_name (from list-datasets) or dataset_path (a folder)")
    if dataset_name is not None:
        folder = Path(workspace) / "datasets" / checked_name("dataset", dataset_name)
    else:
        check_user_path("dataset_path", dataset_path, workspace)
        given = Path(dataset_path).expanduser()
        folder = given if given.is_absolute() else Path(workspace) / given
    if not folder.is_dir():
        raise ServiceError(f"no dataset folder {folder}; list-datasets shows the datasets there are")
    return folder.resolve()
