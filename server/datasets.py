"""Datasets uploaded through the server: `<workspace>/datasets/<name>/`, one folder per dataset.

`upload` takes images as base64 with optional captions and judges each file on its own: a
file is saved only when its name is a plain image file name, or one with one folder level
(`10_cat/a.png`, `validation/b.png`, `class/c.png`: the layout training reads), its bytes decode fully as an
image of the format its suffix says, and it does not replace an existing file unless asked.
A saved image is written atomically together with its same-named `.txt` caption, so the
folder never holds a torn image or an image whose caption is missing half-way; a refused file
leaves nothing behind. The folder layout is the one `training.data.dataset.scan_dataset` reads,
so a config can name the dataset by its name (dataset_path=<name>).

`upload_zip` takes the same images as a zip file (POST /datasets/<name> over HTTP), in the folder layout
import_folder takes; server.dataset_zip judges the zip's entries before any is read, and each image then
gets the judgement and the atomic write of an upload.

`import_folder` brings in a kohya-style folder from the server's disk (root images, `N_name`
repeat folders, concept folders, `validation/`), copying or linking each image that passes the
same checks as an upload, with its caption; a file or link whose target lies outside the
workspace and LORA_MCP_ALLOWED_DIRS is refused, never followed. `update_captions` rewrites
captions (by file, by find/replace, or by making sure a trigger word is there), each `.txt`
atomically. `delete` removes a dataset folder; for a linked dataset only the links go.

This module is a plain service: the MCP tools wrap it, tests call it directly. It imports no
torch at import time.

The parts live beside it: server.dataset_schemas (the models the tools take and return),
server.image_checks (the checks every image passes, uploaded or imported, and the atomic writes),
server.dataset_import (import_folder), server.caption_edits (update_captions) and
server.dataset_contents (counting what a dataset folder holds).
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from server import caption_edits, dataset_import, dataset_staging, dataset_zip
from server.dataset_contents import CAPTION_SUFFIX, count_dataset, remove_empty_folder
from server.dataset_import import MAX_CAPTION_BYTES, MAX_IMPORT_ENTRIES
from server.dataset_schemas import (
    CAPTION_SHOWN_CHARS,
    CaptionOutcome,
    CaptionUpdateResult,
    DatasetSummary,
    FileOutcome,
    ImportedConcept,
    ImportResult,
    Refused,
    UploadImage,
    UploadResult,
)
from server.errors import ServiceError, WorkspaceStateError
from server.image_checks import (
    MAX_DATASET_BYTES,
    MAX_IMAGE_BYTES,
    check_filename,
    check_room,
    checked_image,
    dataset_bytes,
    decoded_bytes,
    write_image_with_caption,
)
from server.name_locks import name_lock
from server.names import checked_name
from training.data.dataset import IMAGE_SUFFIXES

# Re-exported: the names callers have always imported from here. The limits are read where they are
# defined (server.image_checks, server.dataset_import): patch them there, not here.
__all__ = [
    "CAPTION_SHOWN_CHARS",
    "CAPTION_SUFFIX",
    "MAX_CAPTION_BYTES",
    "MAX_DATASET_BYTES",
    "MAX_IMAGES_PER_CALL",
    "MAX_IMAGE_BYTES",
    "MAX_IMPORT_ENTRIES",
    "CaptionOutcome",
    "CaptionUpdateResult",
    "DatasetService",
    "DatasetSummary",
    "FileOutcome",
    "ImportResult",
    "ImportedConcept",
    "UploadImage",
    "UploadResult",
]

MAX_IMAGES_PER_CALL = 200


class DatasetService:
    def __init__(self, workspace: Path):
        self.workspace = Path(workspace)
        self.folder = self.workspace / "datasets"

    # --- upload ----------------------------------------------------------------------------------
    def upload(self, dataset_name: str, images: list[UploadImage | dict], overwrite: bool = False) -> UploadResult:
        name = checked_name("dataset", dataset_name)
        if not isinstance(images, list | tuple):
            raise ServiceError("images must be a list of {filename, content (base64), caption} objects")
        if not images:
            raise ServiceError("images is empty: give at least one {filename, content (base64), caption} object")
        if len(images) > MAX_IMAGES_PER_CALL:
            raise ServiceError(
                f"{len(images)} images in one call is too many: the limit is {MAX_IMAGES_PER_CALL} per call. "
                f"Upload them in batches of at most {MAX_IMAGES_PER_CALL} to the same dataset_name; "
                "each batch adds to the dataset."
            )
        # One writer per dataset (upload, import, caption edits, delete): the existence checks and the
        # same-stem checks below read the folder that the writes change. Readers take no lock.
        with name_lock(self.workspace, "dataset", name):
            return self._upload(name, images, overwrite)

    def _upload(self, name: str, images: list[UploadImage | dict], overwrite: bool) -> UploadResult:
        folder = self.folder / name
        if folder.exists() and not folder.is_dir():
            raise WorkspaceStateError(f"{folder} exists but is not a folder: remove it or choose another dataset_name")
        folder_existed = folder.is_dir()

        outcomes: list[FileOutcome] = []
        seen_names: set[str] = set()
        seen_stems: dict[str, str] = {}  # caption file's path less .txt -> first filename in this batch with it
        contents = _FolderIndex(folder)
        for index, item in enumerate(images):
            filename = _given_filename(item, index)
            try:
                outcome = self._upload_one(contents, item, filename, overwrite, seen_names, seen_stems)
            except Refused as refusal:
                outcome = FileOutcome(filename=filename, saved=False, reason=str(refusal))
            outcomes.append(outcome)

        return self._upload_result(name, folder, folder_existed, outcomes)

    def _upload_result(
        self, name: str, folder: Path, folder_existed: bool, outcomes: list[FileOutcome]
    ) -> UploadResult:
        saved = sum(o.saved for o in outcomes)
        refused = len(outcomes) - saved
        if not saved:
            if not folder_existed:
                remove_empty_folder(folder)
            raise ServiceError(
                f"no image was saved to dataset {name!r}; every file was refused: "
                + "; ".join(f"{o.filename}: {o.reason}" for o in outcomes)
            )
        return UploadResult(
            dataset_name=name,
            path=str(folder),
            saved=saved,
            refused=refused,
            files=outcomes,
            next_step=self._next_step(name, folder, refused),
        )

    def _upload_one(
        self,
        contents: _FolderIndex,
        item: Any,
        filename: str,
        overwrite: bool,
        seen_names: set[str],
        seen_stems: dict[str, str],
    ) -> FileOutcome:
        image = _as_upload_image(item)
        check_filename(image.filename)
        if image.filename in seen_names:
            raise Refused(
                "the same filename appears earlier in this batch; only the first is considered. "
                "Give each image its own name."
            )
        seen_names.add(image.filename)
        stem = Path(image.filename).with_suffix("").as_posix()  # with its folder: '10_cat/a'
        if stem in seen_stems:
            raise Refused(
                f"it would share the caption file {stem}{CAPTION_SUFFIX} with {seen_stems[stem]} earlier in this "
                "batch: give it a different name before the suffix"
            )
        seen_stems[stem] = image.filename

        return self._save_image(contents, image.filename, decoded_bytes(image), image.caption, overwrite)

    def _save_image(
        self, contents: _FolderIndex, rel: str, data: bytes, caption: str | None, overwrite: bool
    ) -> FileOutcome:
        """The judgement of an image whose bytes are in hand (from base64 or a zip), saved at `rel` in the
        dataset folder of `contents` ('a.png', or '10_xyz_cat/a.png' from a zip) with its caption."""
        check_room(contents.path, len(data), contents.used)
        width, height = checked_image(rel, data)
        path = contents.path / rel
        try:
            self._check_place(contents, rel, overwrite)
            replaced = _own_bytes(path) + _own_bytes(path.with_suffix(CAPTION_SUFFIX))
            caption = caption.strip() if caption is not None else ""
            write_image_with_caption(path, data, caption or None)
            contents.saved(path, replaced)
            captioned = path.with_suffix(CAPTION_SUFFIX).is_file()
        except OSError as exc:  # e.g. a path the file system refuses (too long): this file only is refused
            raise Refused(
                f"it could not be saved ({exc.strerror or exc}): check its path and the server's disk"
            ) from None
        return FileOutcome(filename=rel, saved=True, width=width, height=height, captioned=captioned)

    @staticmethod
    def _check_place(contents: _FolderIndex, rel: str, overwrite: bool) -> None:
        """Refuse an image whose place in the dataset is taken, or reached through a link or a file."""
        path = contents.path / rel
        stem = path.stem
        for parent in list(Path(rel).parents)[:-1]:  # the subfolders it goes in: never through a link or a file
            if (contents.path / parent).is_symlink() or (contents.path / parent).is_file():
                raise Refused(
                    f"{parent.as_posix()} in the dataset is a link or a file, not a folder: put the image in "
                    "another folder"
                )
        twin = contents.twin(path)
        if twin is not None:
            raise Refused(
                f"{twin} is already in the dataset and would share the caption file {stem}{CAPTION_SUFFIX}: "
                "give this image a different name before the suffix"
            )
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise Refused(
                    "a file with this name is already in the dataset: upload it under another name, "
                    "or again with overwrite=true to replace it"
                )
            if not path.is_file():
                raise Refused("something that is not an image file is in the way with this name: use another name")

    def _next_step(self, name: str, folder: Path, refused: int) -> str:
        images, captioned, _ = count_dataset(folder)
        text = (
            f"Dataset {name!r} now holds {images} image(s), {captioned} with a caption. "
            f"Create a training config with create-training-config and dataset_path={name!r} "
            "(the dataset's name is enough)."
        )
        if captioned < images:
            text += " Images without a caption train on the trigger word alone; upload captions to improve that."
        if refused:
            text += (
                f" {refused} file(s) were refused (see files[].reason): fix them and upload just those again "
                "to the same dataset_name; saved files stay."
            )
        return text

    # --- upload a zip (POST /datasets/<name> over HTTP) -------------------------------------------------
    def new_upload_file(self) -> tuple[int, Path]:
        """A hidden temporary file in datasets/ to receive a zip into (open descriptor, path); those a killed
        server left behind are removed first (server.dataset_staging)."""
        return dataset_staging.upload_file(self.folder)

    def zip_target(self, dataset_name: str, overwrite: bool) -> Path:
        """The folder of the dataset a zip goes to; WorkspaceStateError when it cannot take one: as with
        import-dataset, an existing dataset takes a zip only with overwrite. The HTTP route asks before it
        receives the body, and upload_zip again under the dataset's lock."""
        name = checked_name("dataset", dataset_name)
        folder = self.folder / name
        folder_existed = folder.is_dir()
        if (folder.exists() or folder.is_symlink()) and not folder_existed:
            raise WorkspaceStateError(f"{folder} exists but is not a folder: remove it or choose another name")
        if folder_existed and not overwrite:
            images, _, _ = count_dataset(folder)
            raise WorkspaceStateError(
                f"dataset {name!r} already exists ({images} image(s)): send the zip to another dataset name, "
                "or again with overwrite=true to add its files (files of the same path are replaced)"
            )
        return folder

    def upload_zip(self, dataset_name: str, archive: Path, overwrite: bool = False) -> UploadResult:
        """Save the images of the zip file `archive` with their same-named .txt captions, in the zip's folders
        (the root, kohya `N_name` concept folders, `validation/`), each judged and written as an uploaded image
        is; the zip's entries are judged before any is read (server.dataset_zip). Overwrite also replaces files
        of the same path. A new dataset is written to a staging folder that takes its name at the end, so an
        unexpected fault half-way leaves nothing; an existing one keeps the files saved before such a fault."""
        name = checked_name("dataset", dataset_name)
        with name_lock(self.workspace, "dataset", name):
            folder = self.zip_target(name, overwrite)
            with dataset_zip.opened(archive) as zipped:
                planned, outcomes = dataset_zip.plan(zipped)
                if folder.is_dir():
                    self._save_zipped(zipped, planned, _FolderIndex(folder), overwrite, outcomes)
                    return self._upload_result(name, folder, True, outcomes)
                self._save_new_dataset(zipped, planned, folder, outcomes)
            return self._upload_result(name, folder, False, outcomes)

    def _save_new_dataset(
        self,
        zipped: zipfile.ZipFile,
        planned: list[dataset_zip.PlannedImage],
        folder: Path,
        outcomes: list[FileOutcome],
    ) -> None:
        """Save the images to a staging folder that becomes the dataset `folder` once all are saved (if any is)."""
        staging = dataset_staging.staging_folder(self.folder)
        try:
            self._save_zipped(zipped, planned, _FolderIndex(staging), False, outcomes)
            if any(outcome.saved for outcome in outcomes):
                try:
                    staging.rename(folder)  # the dataset's lock keeps other writers out: the name is still free
                except OSError as exc:
                    raise WorkspaceStateError(
                        f"the new dataset could not take its name {folder.name!r} ({exc.strerror or exc}): check "
                        f"{self.folder}, then send the zip again"
                    ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when it took the dataset's name

    def _save_zipped(
        self,
        zipped: zipfile.ZipFile,
        planned: list[dataset_zip.PlannedImage],
        contents: _FolderIndex,
        overwrite: bool,
        outcomes: list[FileOutcome],
    ) -> None:
        for item in planned:
            try:
                data, caption = dataset_zip.read_image(zipped, item)
                outcomes.append(self._save_image(contents, item.rel, data, caption, overwrite))
            except Refused as refusal:
                outcomes.append(FileOutcome(filename=item.rel, saved=False, reason=str(refusal)))

    # --- list ------------------------------------------------------------------------------------
    def list(self) -> list[DatasetSummary]:
        if not self.folder.is_dir():
            return []
        summaries = []
        for path in sorted(self.folder.iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue
            images, captioned, size = count_dataset(path)
            summaries.append(
                DatasetSummary(name=path.name, path=str(path), images=images, captioned=captioned, size_bytes=size)
            )
        return summaries

    # --- import ----------------------------------------------------------------------------------
    def import_folder(
        self,
        dataset_name: str,
        source_path: str,
        mode: Literal["copy", "link"] = "copy",
        overwrite: bool = False,
    ) -> ImportResult:
        """Bring a kohya-style folder on the server's disk into the dataset `dataset_name`, file by file."""
        name = checked_name("dataset", dataset_name)
        with name_lock(self.workspace, "dataset", name):
            return dataset_import.import_folder(self.workspace, name, self.folder / name, source_path, mode, overwrite)

    # --- delete ----------------------------------------------------------------------------------
    def delete(self, dataset_name: str) -> None:
        """Remove the dataset's folder. Links (from a link-mode import) are removed, never what they lead to."""
        name = checked_name("dataset", dataset_name)
        with name_lock(self.workspace, "dataset", name):
            folder = self.folder / name
            try:
                if folder.is_symlink():  # a dataset folder that is itself a link: remove the link only
                    folder.unlink()
                    return
                self._existing_dataset(name)
                shutil.rmtree(folder)  # does not follow links: linked files and folders are left alone
            except OSError as exc:
                raise WorkspaceStateError(
                    f"dataset {name!r} could not be deleted completely ({exc.strerror or exc}): check the "
                    f"permissions of {folder}, then delete it again"
                ) from None

    # --- captions --------------------------------------------------------------------------------
    def update_captions(
        self,
        dataset_name: str,
        edits: dict[str, str] | None = None,
        find: str | None = None,
        replace: str | None = None,
        trigger_word: str | None = None,
    ) -> CaptionUpdateResult:
        """Rewrite captions. Applied in this order to each caption: `edits` (new caption per image), then
        `find`/`replace` on every existing caption, then `trigger_word` put first where it is missing.
        Each changed `.txt` is written once, atomically (a linked caption is replaced by a file of the
        dataset's own; its source stays as it was)."""
        name = checked_name("dataset", dataset_name)
        with name_lock(self.workspace, "dataset", name):  # read every caption, then write the changed ones
            folder = self._existing_dataset(name)
            return caption_edits.update_captions(name, folder, edits, find, replace, trigger_word)

    def _existing_dataset(self, name: str) -> Path:
        folder = self.folder / name
        if not folder.is_dir():
            known = [s.name for s in self.list()]
            raise WorkspaceStateError(
                f"there is no dataset named {name!r}"
                + (f" (datasets: {', '.join(known[:20])}{', ...' if len(known) > 20 else ''})" if known else "")
                + ": call list-datasets to see them, and use one of those names"
            )
        return folder


# --- one uploaded item ---------------------------------------------------------------------------
def _given_filename(item: Any, index: int) -> str:
    """The name to report an item under, even when the item is malformed."""
    if isinstance(item, UploadImage):
        return item.filename
    if isinstance(item, dict) and isinstance(item.get("filename"), str):
        return item["filename"]
    return f"images[{index}]"


def _as_upload_image(item: Any) -> UploadImage:
    if isinstance(item, UploadImage):
        return item
    if not isinstance(item, dict):
        raise Refused("each item of images must be an object {filename, content (base64), caption}")
    try:
        return UploadImage.model_validate(item)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'item'}: {error['msg']}" for error in exc.errors()
        )
        raise Refused(f"malformed item ({problems}); give {{filename, content (base64), caption}}") from None


def _own_bytes(path: Path) -> int:
    """The size of the file at `path` as the dataset's size limit counts it: links count as nothing."""
    return path.lstat().st_size if path.is_file() and not path.is_symlink() else 0


class _FolderIndex:
    """What the saves of one upload need to know of the dataset's folder, read once and kept up to date as
    files are saved: reading the folder again for every image (its size for the limit, a subfolder's listing
    for an image of the same stem) made an upload quadratic (500 images 6 s, 2,000 images 91 s)."""

    def __init__(self, path: Path):
        self.path = path
        self.used = dataset_bytes(path)
        self._images: dict[Path, dict[str, set[str]]] = {}  # subfolder -> stem -> its image files' names

    def twin(self, path: Path) -> str | None:
        """An image already beside `path` with its stem but another name (it would share the caption)."""
        return min(self._stems(path.parent).get(path.stem, set()) - {path.name}, default=None)

    def saved(self, path: Path, replaced: int) -> None:
        """Count the image just written at `path` and its caption, in place of `replaced` bytes."""
        self._stems(path.parent).setdefault(path.stem, set()).add(path.name)
        self.used += _own_bytes(path) + _own_bytes(path.with_suffix(CAPTION_SUFFIX)) - replaced

    def _stems(self, folder: Path) -> dict[str, set[str]]:
        if folder not in self._images:
            stems: dict[str, set[str]] = {}
            try:
                entries = list(folder.iterdir()) if folder.is_dir() else []
            except OSError:
                entries = []
            for entry in entries:
                if entry.suffix.lower() in IMAGE_SUFFIXES:
                    stems.setdefault(entry.stem, set()).add(entry.name)
            self._images[folder] = stems
        return self._images[folder]
