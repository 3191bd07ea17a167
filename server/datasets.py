"""Datasets uploaded through the server: `<workspace>/datasets/<name>/`, one folder per dataset.

`upload` takes images as base64 with optional captions and judges each file on its own: a
file is saved only when its name is a plain image file name, its bytes decode fully as an
image of the format its suffix says, and it does not replace an existing file unless asked.
A saved image is written atomically together with its same-named `.txt` caption, so the
folder never holds a torn image or an image whose caption is missing half-way; a refused file
leaves nothing behind. The folder layout is the one `training.data.dataset.scan_dataset` reads,
so a config can name the dataset by its name (dataset_path=<name>).

`import_folder` brings in a kohya-style folder from the server's disk (root images, `N_name`
repeat folders, concept folders, `validation/`), copying or linking each image that passes the
same checks as an upload, with its caption; a file or link whose target lies outside the
workspace and LORA_MCP_ALLOWED_DIRS is refused, never followed. `update_captions` rewrites
captions (by file, by find/replace, or by making sure a trigger word is there), each `.txt`
atomically. `delete` removes a dataset folder; for a linked dataset only the links go.

This module is a plain service: the MCP tools wrap it, tests call it directly. It imports no
torch at import time.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from server.errors import ServiceError
from server.limits import megabytes
from server.names import checked_name
from server.paths import ALLOWED_DIRS_ENV, allowed_roots, check_user_path
from training.data.dataset import IMAGE_SUFFIXES, VALIDATION_FOLDER, with_trigger_first
from training.workspace import atomic_output, atomic_write_bytes, atomic_write_text

MAX_IMAGES_PER_CALL = 200
MAX_IMAGE_BYTES = megabytes("LORA_MCP_MAX_IMAGE_MB", 50)  # decoded bytes of one image
MAX_DATASET_BYTES = megabytes("LORA_MCP_MAX_DATASET_MB", 20 * 1024)  # all files of one dataset
MAX_CAPTION_BYTES = 1024 * 1024  # one imported caption file
MAX_IMPORT_ENTRIES = 20_000  # files and folders one import walks through
CAPTION_SUFFIX = ".txt"
CAPTION_SHOWN_CHARS = 200  # captions in a result are cut to this

# Pillow's format names for each accepted suffix (MPO is the multi-picture JPEG many cameras write).
_FORMATS_BY_SUFFIX = {
    ".jpg": ("JPEG", "MPO"),
    ".jpeg": ("JPEG", "MPO"),
    ".png": ("PNG",),
    ".webp": ("WEBP",),
}
_SUFFIX_BY_FORMAT = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp"}
_DATA_URL = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(rb"\s+")
_MAX_NAME_BYTES = 255
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")  # as training.data.dataset reads it
_DRIVE = re.compile(r"^[A-Za-z]:")


class UploadImage(BaseModel):
    """One item of upload-dataset's `images`."""

    filename: str = Field(
        description="Plain file name inside the dataset, e.g. 'img001.png' (no folders); "
        "it must end in .jpg, .jpeg, .png or .webp and match the image's real format."
    )
    content: str | None = Field(
        None, description="The image file's bytes as standard base64 (a 'data:image/...;base64,' prefix is accepted)."
    )
    data: str | None = Field(None, description="Accepted as a synonym of content; give one of the two.")
    caption: str | None = Field(
        None, description="Caption saved as the same-named .txt file beside the image (e.g. img001.txt)."
    )


class FileOutcome(BaseModel):
    filename: str = Field(description="The file name as given.")
    saved: bool = Field(description="True when the image (and its caption, if given) is now in the dataset.")
    reason: str | None = Field(None, description="Why the file was refused, and what to do; None when saved.")
    width: int | None = Field(None, description="Image width in pixels, when saved.")
    height: int | None = Field(None, description="Image height in pixels, when saved.")
    captioned: bool = Field(False, description="True when a .txt caption now sits beside the saved image.")


class UploadResult(BaseModel):
    dataset_name: str = Field(description="The dataset's name; use it as dataset_path in a training config.")
    path: str = Field(description="The dataset folder on the server.")
    saved: int = Field(description="Images saved by this call.")
    refused: int = Field(description="Images refused by this call (see files[].reason).")
    files: list[FileOutcome] = Field(description="One outcome per uploaded item, in the order given.")
    next_step: str = Field(description="What to do next.")


class DatasetSummary(BaseModel):
    name: str = Field(description="The dataset's name; use it as dataset_path in a training config.")
    path: str = Field(description="The dataset folder on the server.")
    images: int = Field(description="Image files (.jpg/.jpeg/.png/.webp), subfolders included.")
    captioned: int = Field(description="Images that have a same-named .txt caption.")
    size_bytes: int = Field(description="Total size of the dataset's files in bytes.")


class ImportedConcept(BaseModel):
    folder: str = Field(
        description="The concept's folder inside the dataset, e.g. '10_xyz_cat'; '' for the images at the "
        "dataset's root."
    )
    name: str = Field(
        description="The concept's name: the folder name without its repeat count (e.g. 'xyz_cat'); training "
        "uses it as the concept's trigger word unless the config's trigger_words says otherwise. '' for root images."
    )
    repeats: int = Field(description="How often each image of the concept is used per epoch (the folder's N_ prefix).")
    images: int = Field(description="Images the concept holds now, subfolders included.")


class ImportResult(BaseModel):
    dataset_name: str = Field(description="The dataset's name; use it as dataset_path in a training config.")
    path: str = Field(description="The dataset folder on the server.")
    source: str = Field(description="The folder imported from, with links resolved.")
    mode: Literal["copy", "link"] = Field(
        description="copy: the dataset holds its own copies. link: the dataset holds links to the source files, "
        "which must stay where they are."
    )
    imported: int = Field(description="Images brought in by this call (each with its caption when it had one).")
    refused: int = Field(
        description="Files found but not brought in: bad images, links leading outside the allowed folders, "
        "files that are neither images nor captions (see files[].reason)."
    )
    concepts: list[ImportedConcept] = Field(
        description="The dataset's concepts as training will see them (after this import)."
    )
    validation_images: int = Field(description="Images in the dataset's validation/ folder (held out from training).")
    files: list[FileOutcome] = Field(
        description="One outcome per file found, by its path relative to the source folder (e.g. '10_xyz_cat/a.png'); "
        "captions that came with their image are not listed separately (see captioned)."
    )
    next_step: str = Field(description="What to do next.")


class CaptionOutcome(BaseModel):
    filename: str = Field(description="The image's path inside the dataset (for a refused edit: the key as given).")
    changed: bool = Field(description="True when this call rewrote the image's caption file.")
    caption: str | None = Field(
        None,
        description=f"The image's caption now (cut to {CAPTION_SHOWN_CHARS} characters); None when it has none.",
    )
    reason: str | None = Field(None, description="Why the edit was refused or failed, and what to do; None otherwise.")


class CaptionUpdateResult(BaseModel):
    dataset_name: str = Field(description="The dataset's name.")
    path: str = Field(description="The dataset folder on the server.")
    changed: int = Field(description="Images whose caption this call rewrote.")
    unchanged: int = Field(description="Images looked at whose caption was already as asked.")
    refused: int = Field(description="Edits refused or failed (see files[].reason); the others were applied.")
    files: list[CaptionOutcome] = Field(description="One outcome per image looked at, then one per refused edit.")
    next_step: str = Field(description="What to do next.")


class _Refused(Exception):
    """One file is refused; the message is its reason."""


@dataclass
class _PlannedImage:
    """An image found by an import, with its caption file when it has one (both with links resolved)."""

    rel: str  # relative path inside the source, '/'-separated
    source: Path
    caption_rel: str | None
    caption_source: Path | None


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
        folder = self.folder / name
        if folder.exists() and not folder.is_dir():
            raise ServiceError(f"{folder} exists but is not a folder: remove it or choose another dataset_name")
        folder_existed = folder.is_dir()

        outcomes: list[FileOutcome] = []
        seen_names: set[str] = set()
        seen_stems: dict[str, str] = {}  # caption file stem -> first filename in this batch with it
        for index, item in enumerate(images):
            filename = _given_filename(item, index)
            try:
                outcome = self._upload_one(folder, item, filename, overwrite, seen_names, seen_stems)
            except _Refused as refusal:
                outcome = FileOutcome(filename=filename, saved=False, reason=str(refusal))
            outcomes.append(outcome)

        saved = sum(o.saved for o in outcomes)
        refused = len(outcomes) - saved
        if not saved:
            if not folder_existed:
                _remove_empty_folder(folder)
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
        folder: Path,
        item: Any,
        filename: str,
        overwrite: bool,
        seen_names: set[str],
        seen_stems: dict[str, str],
    ) -> FileOutcome:
        image = _as_upload_image(item)
        _check_filename(image.filename)
        if image.filename in seen_names:
            raise _Refused(
                "the same filename appears earlier in this batch; only the first is considered. "
                "Give each image its own name."
            )
        seen_names.add(image.filename)
        stem = Path(image.filename).stem
        if stem in seen_stems:
            raise _Refused(
                f"it would share the caption file {stem}{CAPTION_SUFFIX} with {seen_stems[stem]} earlier in this "
                "batch: give it a different name before the suffix"
            )
        seen_stems[stem] = image.filename

        data = _decoded_bytes(image)
        _check_room(folder, len(data))
        width, height = _checked_image(image.filename, data)

        path = folder / image.filename
        twin = _existing_twin(folder, image.filename)
        if twin is not None:
            raise _Refused(
                f"{twin} is already in the dataset and would share the caption file {stem}{CAPTION_SUFFIX}: "
                "give this image a different name before the suffix"
            )
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise _Refused(
                    "a file with this name is already in the dataset: upload it under another name, "
                    "or again with overwrite=true to replace it"
                )
            if not path.is_file():
                raise _Refused("something that is not an image file is in the way with this name: use another name")

        caption = image.caption.strip() if image.caption is not None else ""
        _write(path, data, caption or None)
        return FileOutcome(
            filename=image.filename,
            saved=True,
            width=width,
            height=height,
            captioned=path.with_suffix(CAPTION_SUFFIX).is_file(),
        )

    def _next_step(self, name: str, folder: Path, refused: int) -> str:
        images, captioned, _ = _count(folder)
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

    # --- list ------------------------------------------------------------------------------------
    def list(self) -> list[DatasetSummary]:
        if not self.folder.is_dir():
            return []
        summaries = []
        for path in sorted(self.folder.iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue
            images, captioned, size = _count(path)
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
        if mode not in ("copy", "link"):
            raise ServiceError(
                f"mode {mode!r} is not known: use 'copy' (the dataset gets its own copies) or 'link' (the dataset "
                "links to the files where they are)"
            )
        source = self._checked_source(source_path)
        roots = allowed_roots(self.workspace)
        folder = self.folder / name
        target = folder.resolve()
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            raise ServiceError(
                f"source_path {source_path!r} ({source}) and the dataset folder {folder} contain one another: "
                "give the folder that holds just the images and their captions, or another dataset_name"
            )
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise ServiceError(f"{folder} exists but is not a folder: remove it or choose another dataset_name")
            if not overwrite:
                images, _, _ = _count(folder)
                raise ServiceError(
                    f"dataset {name!r} already exists ({images} image(s)): choose another dataset_name, or import "
                    "again with overwrite=true to add these files to it (files with the same path are replaced, "
                    "the others kept)"
                )
        folder_existed = folder.is_dir()

        planned, outcomes = _plan_import(source, roots, target)
        for item in planned:
            outcomes.extend(_import_one(folder, item, mode, overwrite))
        outcomes.sort(key=lambda o: o.filename)

        imported = sum(o.saved for o in outcomes)
        refused = len(outcomes) - imported
        if not imported:
            if not folder_existed:
                _remove_empty_tree(folder)
            if not outcomes:
                raise ServiceError(
                    f"{source} holds no files to import (hidden files are skipped): put the images "
                    "(.jpg/.jpeg/.png/.webp, each with a same-named .txt caption) in it, at its root or in concept "
                    "subfolders such as 10_xyz_cat/"
                )
            raise ServiceError(
                f"nothing was imported into dataset {name!r}; no image in {source} could be taken: "
                + _listed(f"{o.filename}: {o.reason}" for o in outcomes)
            )
        concepts, validation = _concepts(folder)
        return ImportResult(
            dataset_name=name,
            path=str(folder),
            source=str(source),
            mode=mode,
            imported=imported,
            refused=refused,
            concepts=concepts,
            validation_images=validation,
            files=outcomes,
            next_step=self._import_next_step(name, folder, mode, concepts, refused),
        )

    def _checked_source(self, source_path: str) -> Path:
        if not isinstance(source_path, str) or not source_path.strip():
            raise ServiceError("source_path is empty: give the absolute path of a folder on the server")
        given = Path(source_path.strip()).expanduser()
        source = (given if given.is_absolute() else self.workspace / given).resolve()
        # Outside the allowed folders is refused before anything else is said about the path.
        check_user_path("source_path", str(source), self.workspace)
        if not source.exists():
            raise ServiceError(
                f"source_path {source_path!r} ({source}) does not exist: give the absolute path of a folder on the "
                "server (relative paths are taken from the workspace)"
            )
        if not source.is_dir():
            raise ServiceError(
                f"source_path {source_path!r} ({source}) is a file, not a folder: give the folder that holds the "
                "images (to add single images, use upload-dataset)"
            )
        return source

    def _import_next_step(
        self, name: str, folder: Path, mode: str, concepts: list[ImportedConcept], refused: int
    ) -> str:
        images, captioned, _ = _count(folder)
        text = (
            f"Dataset {name!r} now holds {images} image(s), {captioned} with a caption. "
            f"Create a training config with create-training-config and dataset_path={name!r}."
        )
        if len(concepts) > 1:
            text += (
                " It has several concepts: each trains on its folder's name as trigger word unless the config's "
                "trigger_words maps the folder to another."
            )
        if any(c.repeats < 1 for c in concepts):
            text += " A folder with repeat count 0 (0_name) cannot be trained: rename it to 1_name or more."
        if captioned < images:
            text += " Images without a caption train on the trigger word alone; add captions with update-captions."
        if mode == "link":
            text += (
                " The dataset links to the source files: keep them where they are (delete-dataset removes only "
                "the links)."
            )
        if refused:
            text += (
                f" {refused} file(s) were not imported (see files[].reason): fix the images in the source folder "
                "and import again with overwrite=true; imported files stay."
            )
        return text

    # --- delete ----------------------------------------------------------------------------------
    def delete(self, dataset_name: str) -> None:
        """Remove the dataset's folder. Links (from a link-mode import) are removed, never what they lead to."""
        name = checked_name("dataset", dataset_name)
        folder = self.folder / name
        try:
            if folder.is_symlink():  # a dataset folder that is itself a link: remove the link only
                folder.unlink()
                return
            self._existing_dataset(name)
            shutil.rmtree(folder)  # does not follow links: linked files and folders are left alone
        except OSError as exc:
            raise ServiceError(
                f"dataset {name!r} could not be deleted completely ({exc.strerror or exc}): check the permissions "
                f"of {folder}, then delete it again"
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
        folder = self._existing_dataset(name)
        if edits is not None and not isinstance(edits, dict):
            raise ServiceError(
                "edits must be an object mapping an image's path in the dataset to its new caption, e.g. "
                '{"img1.png": "xyz_cat, a cat on a sofa", "10_xyz_cat/img2.png": "..."}'
            )
        if (find is None) != (replace is None):
            raise ServiceError(
                "find and replace go together: give both (replace='' deletes the found text), or neither"
            )
        if find is not None and (not isinstance(find, str) or not isinstance(replace, str)):
            raise ServiceError("find and replace must be text")
        if find == "":
            raise ServiceError("find is empty: give the text to look for in every caption")
        trigger = None
        if trigger_word is not None:
            trigger = " ".join(str(trigger_word).split())
            if not trigger:
                raise ServiceError("trigger_word is empty: give the word every caption should start with")
        if not edits and find is None and trigger is None:
            raise ServiceError(
                "nothing to do: give edits ({image path: new caption}), find and replace, or trigger_word"
            )

        images = _dataset_images(folder)
        if not images:
            raise ServiceError(
                f"dataset {name!r} holds no images, so it has no captions to update: add images with "
                "upload-dataset or import-dataset first"
            )
        caption_of = {rel: path.with_suffix(CAPTION_SUFFIX) for rel, path in images.items()}
        original: dict[Path, str | None] = {}  # caption file -> its text (stripped), None without one
        current: dict[Path, str | None] = {}  # caption file -> its text after this call

        def text_of(caption_path: Path) -> str | None:
            if caption_path not in original:
                original[caption_path] = _read_caption(caption_path)
            return current.get(caption_path, original[caption_path])

        looked_at: list[str] = []
        refusals: list[CaptionOutcome] = []
        for key, new_caption in (edits or {}).items():
            try:
                rel = _edit_target(key, images)
                if rel in looked_at:
                    raise _Refused(f"{rel} is already edited by an earlier key of edits: give each image once")
                text = _edit_text(new_caption)
            except _Refused as refusal:
                refusals.append(CaptionOutcome(filename=str(key), changed=False, reason=str(refusal)))
                continue
            text_of(caption_of[rel])
            current[caption_of[rel]] = text
            looked_at.append(rel)

        if find is not None or trigger is not None:
            looked_at += [rel for rel in images if rel not in looked_at]
            for caption_path in dict.fromkeys(caption_of.values()):  # each caption file once
                text = text_of(caption_path)
                if find is not None and text is not None:
                    text = text.replace(find, replace).strip()
                if trigger is not None:
                    text = with_trigger_first(text or "", trigger)
                current[caption_path] = text

        failed: dict[Path, str] = {}
        written: set[Path] = set()
        for caption_path, text in current.items():
            if text is None or text == original[caption_path]:
                continue
            try:
                atomic_write_text(caption_path, text)
                written.add(caption_path)
            except OSError as exc:
                failed[caption_path] = (
                    f"the caption could not be written ({exc.strerror or exc}): check the server's disk and the "
                    f"permissions of {caption_path.parent}, then try again"
                )
                current[caption_path] = original[caption_path]

        outcomes = [
            CaptionOutcome(
                filename=rel,
                changed=caption_of[rel] in written,
                caption=_shown(current.get(caption_of[rel], original.get(caption_of[rel]))),
                reason=failed.get(caption_of[rel]),
            )
            for rel in looked_at
        ]
        changed = sum(o.changed for o in outcomes)
        failures = sum(o.reason is not None for o in outcomes)
        refused = len(refusals) + failures
        return CaptionUpdateResult(
            dataset_name=name,
            path=str(folder),
            changed=changed,
            unchanged=len(outcomes) - changed - failures,
            refused=refused,
            files=outcomes + refusals,
            next_step=self._captions_next_step(name, changed, refused, find is not None),
        )

    def _captions_next_step(self, name: str, changed: int, refused: int, searched: bool) -> str:
        text = f"{changed} caption(s) of dataset {name!r} changed. "
        if not changed and searched:
            text += "find matched no caption (the match is exact, case included): check the text. "
        text += (
            "Training reads captions when a run starts: a run already going keeps the old ones. "
            f"Train with create-training-config and dataset_path={name!r}."
        )
        if refused:
            text += f" {refused} edit(s) were refused (see files[].reason): fix those and call update-captions again."
        return text

    def _existing_dataset(self, name: str) -> Path:
        folder = self.folder / name
        if not folder.is_dir():
            known = [s.name for s in self.list()]
            raise ServiceError(
                f"there is no dataset named {name!r}"
                + (f" (datasets: {', '.join(known[:20])}{', ...' if len(known) > 20 else ''})" if known else "")
                + ": call list-datasets to see them, and use one of those names"
            )
        return folder


# --- one file ------------------------------------------------------------------------------------
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
        raise _Refused("each item of images must be an object {filename, content (base64), caption}")
    try:
        return UploadImage.model_validate(item)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'item'}: {error['msg']}" for error in exc.errors()
        )
        raise _Refused(f"malformed item ({problems}); give {{filename, content (base64), caption}}") from None


def _check_filename(filename: str) -> None:
    plain = "use a plain file name such as 'img001.png', without folders"
    if not filename.strip():
        raise _Refused(f"the filename is empty: {plain}")
    if "/" in filename or "\\" in filename:
        raise _Refused(f"the filename contains a folder separator: {plain}")
    if ".." in filename:
        raise _Refused(f"the filename contains '..': {plain}")
    if filename.startswith("."):
        raise _Refused(f"the filename starts with '.' (a hidden file, which training skips): {plain}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in filename):
        raise _Refused(f"the filename contains control characters: {plain}")
    if len(filename.encode("utf-8", errors="replace")) > _MAX_NAME_BYTES:
        raise _Refused(f"the filename is longer than {_MAX_NAME_BYTES} bytes: use a shorter name")
    if Path(filename).name != filename or not Path(filename).stem:
        raise _Refused(plain)
    suffix = Path(filename).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise _Refused(
            f"{suffix or 'a name without a suffix'} is not taken: an image's name must end in "
            f"{', '.join(IMAGE_SUFFIXES[:-1])} or {IMAGE_SUFFIXES[-1]} (captions go in the caption field, "
            "not as .txt files)"
        )


def _decoded_bytes(image: UploadImage) -> bytes:
    if image.content is not None and image.data is not None and image.content != image.data:
        raise _Refused("both content and data are given and differ: give the base64 in one of them")
    text = image.content if image.content is not None else image.data
    if text is None:
        raise _Refused("no image bytes: give the file's base64 in content")
    text = _DATA_URL.sub("", text.strip(), count=1)
    try:
        raw = _WHITESPACE.sub(b"", text.encode("ascii"))
    except UnicodeEncodeError:
        raise _Refused(_bad_base64("it holds non-ASCII characters")) from None
    if not raw:
        raise _Refused("content is empty: give the image file's bytes as base64")
    if len(raw) // 4 * 3 > MAX_IMAGE_BYTES + 3:  # over the limit before decoding it
        raise _Refused(_too_big(len(raw) // 4 * 3))
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _Refused(_bad_base64(str(exc))) from None
    if len(data) > MAX_IMAGE_BYTES:
        raise _Refused(_too_big(len(data)))
    return data


def _bad_base64(detail: str) -> str:
    return (
        f"content is not valid base64 ({detail}): encode the whole file with standard base64 "
        "(A-Z, a-z, 0-9, '+', '/', '=' padding), e.g. base64.b64encode(open(path, 'rb').read()).decode()"
    )


def _check_room(folder: Path, size: int) -> None:
    """Refuse a file that would take the dataset past MAX_DATASET_BYTES (links count as nothing)."""
    used = (
        sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
        if folder.is_dir()
        else 0
    )
    if used + size > MAX_DATASET_BYTES:
        raise _Refused(
            f"the dataset would pass its size limit of {MAX_DATASET_BYTES // 2**20} MB "
            f"({used // 2**20} MB used; LORA_MCP_MAX_DATASET_MB sets the limit): make room or use another dataset_name"
        )


def _too_big(size: int) -> str:
    return (
        f"the image is {size / 1024 / 1024:.1f} MB; the limit is {MAX_IMAGE_BYTES // 1024 // 1024} MB per image "
        "(LORA_MCP_MAX_IMAGE_MB): "
        "downscale it (training uses about 1 megapixel) or save it as JPEG"
    )


def _checked_image(filename: str, data: bytes, imported: bool = False) -> tuple[int, int]:
    """(width, height) when `data` decodes fully as an image of the format `filename`'s suffix says;
    `imported`: the advice in a refusal is for a file on the server's disk, not for an upload."""
    from PIL import Image, UnidentifiedImageError  # here, not at import: the server's start-up stays light

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            image_format = image.format
            size = image.size
            # Pillow only warns between its pixel limit and twice that; refuse from the limit, before decoding.
            if image.width * image.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
                raise Image.DecompressionBombError(
                    f"{image.width}x{image.height} is more than {Image.MAX_IMAGE_PIXELS} pixels"
                )
            image.load()  # decode fully: a truncated file fails here, not at open
    except Image.DecompressionBombError as exc:
        raise _Refused(f"the image has too many pixels to decode safely ({exc}): downscale it") from None
    except UnidentifiedImageError:
        fix = (
            "replace it with a PNG, JPEG or WebP image, or remove it from the folder"
            if imported
            else "send the image file's own bytes (PNG, JPEG or WebP)"
        )
        raise _Refused(f"the bytes are not an image Pillow can read: {fix}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        fix = "replace it with a complete copy" if imported else "send the complete file again"
        raise _Refused(
            f"the image cannot be decoded fully ({type(exc).__name__}: {exc}); the file is cut short or corrupt: {fix}"
        ) from None
    suffix = Path(filename).suffix.lower()
    if image_format not in _FORMATS_BY_SUFFIX[suffix]:
        right = _SUFFIX_BY_FORMAT.get(image_format or "")
        if right is None:
            raise _Refused(
                f"the bytes are a {image_format or 'unknown'} image, which datasets do not take: "
                "convert it to PNG, JPEG or WebP"
            )
        raise _Refused(
            f"the bytes are a {image_format} image but the name ends in {Path(filename).suffix}: "
            f"rename it to {Path(filename).stem}{right}"
        )
    return size


def _existing_twin(folder: Path, filename: str) -> str | None:
    """An image already in `folder` with the same stem but another name (it would share the caption)."""
    if not folder.is_dir():
        return None
    stem = Path(filename).stem
    try:
        entries = list(folder.iterdir())
    except OSError:
        return None
    for entry in entries:
        if entry.name != filename and entry.stem == stem and entry.suffix.lower() in IMAGE_SUFFIXES:
            return entry.name
    return None


def _write(path: Path, data: bytes, caption: str | bytes | None) -> None:
    """Write the image and its caption, each atomically; both are complete on disk before either replaces
    anything, so a failed write (disk full, ...) leaves the folder as it was."""
    caption_path = path.with_suffix(CAPTION_SUFFIX)
    image_existed = path.exists()
    caption_existed = caption_path.exists()
    try:
        if caption is None:
            atomic_write_bytes(path, data)
        else:
            # The caption is replaced first, the image last: the image's arrival marks the pair complete.
            with atomic_output(path) as image_tmp, atomic_output(caption_path) as caption_tmp:
                image_tmp.write_bytes(data)
                caption_tmp.write_bytes(caption if isinstance(caption, bytes) else caption.encode("utf-8"))
    except OSError as exc:
        if caption is not None and not image_existed and not caption_existed and not path.exists():
            caption_path.unlink(missing_ok=True)  # the caption landed but its image did not
        raise _Refused(
            f"the file could not be written ({exc.strerror or exc}): check the server's disk, then upload it again"
        ) from None


def _remove_empty_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (someone else wrote there) or already gone
        folder.rmdir()


# --- import --------------------------------------------------------------------------------------
def _plan_import(source: Path, roots: list[Path], dataset: Path) -> tuple[list[_PlannedImage], list[FileOutcome]]:
    """Walk `source` (hidden entries skipped) and sort what is found: the images to check and bring in, each
    with its caption, and the outcomes of everything that is refused outright. Every entry is resolved: a
    link that leads outside the allowed folders is refused and never followed."""
    planned: list[_PlannedImage] = []
    outcomes: list[FileOutcome] = []
    entries = 0

    def refuse(rel: str, reason: str) -> None:
        outcomes.append(FileOutcome(filename=rel, saved=False, reason=reason))

    def walk(directory: Path, prefix: str, ancestors: frozenset[Path]) -> None:
        nonlocal entries
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            refuse(
                prefix.rstrip("/") or ".", f"the folder cannot be read ({exc.strerror or exc}): check its permissions"
            )
            return
        files: dict[str, Path] = {}
        for entry in names:
            if entry.startswith("."):
                continue
            entries += 1
            if entries > MAX_IMPORT_ENTRIES:
                raise ServiceError(
                    f"{source} holds more than {MAX_IMPORT_ENTRIES} files and folders: import a folder with just the "
                    "dataset's images and captions, or split it into several datasets"
                )
            rel = prefix + entry
            try:
                resolved = (directory / entry).resolve(strict=True)
                mode = resolved.stat().st_mode
            except (OSError, RuntimeError):
                refuse(rel, "it is a link that leads nowhere (its target is missing, or links loop): fix or remove it")
                continue
            if not any(resolved.is_relative_to(root) for root in roots):
                refuse(
                    rel,
                    f"it is a link to {resolved}, outside the folders this server may use: put the file itself in "
                    f"the folder, or add its folder to {ALLOWED_DIRS_ENV} in the server's environment",
                )
                continue
            if resolved.is_relative_to(dataset):
                refuse(rel, "it is a link into the dataset being imported to: remove it from the source folder")
                continue
            if stat.S_ISDIR(mode):
                if resolved in ancestors:
                    refuse(rel, "it is a link to a folder that contains it (a loop): remove it from the source folder")
                else:
                    walk(resolved, rel + "/", ancestors | {resolved})
            elif stat.S_ISREG(mode):
                files[entry] = resolved
            else:
                refuse(rel, "it is not a regular file (a device, pipe or socket): remove it from the source folder")

        image_stems = {Path(n).stem for n in files if Path(n).suffix.lower() in IMAGE_SUFFIXES}
        for entry, resolved in files.items():
            rel, suffix, stem = prefix + entry, Path(entry).suffix, Path(entry).stem
            if suffix.lower() in IMAGE_SUFFIXES:
                caption = stem + CAPTION_SUFFIX
                with_caption = caption in files
                planned.append(
                    _PlannedImage(rel, resolved, prefix + caption if with_caption else None, files.get(caption))
                )
            elif suffix == CAPTION_SUFFIX and stem in image_stems:
                continue  # it comes with its image
            elif suffix == CAPTION_SUFFIX:
                refuse(rel, "skipped: a caption without a same-named image (.jpg/.jpeg/.png/.webp) beside it")
            elif suffix.lower() == CAPTION_SUFFIX:
                refuse(rel, f"skipped: a caption's name must end in lower-case .txt; rename it to {stem}.txt")
            else:
                refuse(
                    rel,
                    "skipped: not an image (.jpg/.jpeg/.png/.webp) or a .txt caption; datasets take only those",
                )

    walk(source, "", frozenset({source}))
    return planned, outcomes


def _import_one(folder: Path, item: _PlannedImage, mode: str, overwrite: bool) -> list[FileOutcome]:
    """Check one image as an upload is checked and bring it in with its caption; its outcome first, then
    the caption's when only the caption was refused."""
    try:
        data = _read_regular(item.source, MAX_IMAGE_BYTES, _too_big)
        if mode == "copy":
            _check_room(folder, len(data))
        width, height = _checked_image(item.rel, data, imported=True)
    except _Refused as refusal:
        reason = str(refusal) + ("; its caption was not imported either" if item.caption_rel else "")
        return [FileOutcome(filename=item.rel, saved=False, reason=reason)]

    extra: list[FileOutcome] = []
    caption: bytes | None = None
    if item.caption_source is not None and item.caption_rel is not None:
        try:
            caption = _read_regular(item.caption_source, MAX_CAPTION_BYTES, _caption_too_big)
        except _Refused as refusal:
            extra.append(
                FileOutcome(filename=item.caption_rel, saved=False, reason=f"the caption was not imported: {refusal}")
            )

    path = folder / item.rel
    try:
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise _Refused(
                    "a file with this path is already in the dataset: import with overwrite=true to replace it"
                )
            if path.is_dir() and not path.is_symlink():
                raise _Refused("a folder with this path is in the dataset: remove it there, then import again")
        if mode == "copy":
            _write(path, data, caption)
        else:
            _link(path, item.source, item.caption_source if caption is not None else None)
    except _Refused as refusal:
        return [FileOutcome(filename=item.rel, saved=False, reason=str(refusal)), *extra]
    captioned = path.with_suffix(CAPTION_SUFFIX).is_file()
    return [FileOutcome(filename=item.rel, saved=True, width=width, height=height, captioned=captioned), *extra]


def _read_regular(path: Path, limit: int, too_big: Callable[[int], str]) -> bytes:
    """The bytes of the regular file `path` (not a link, pipe or device), at most `limit` of them."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        with open(os.open(path, flags), "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise _Refused("it is not a regular file: remove it from the source folder")
            if info.st_size > limit:
                raise _Refused(too_big(info.st_size))
            data = file.read(limit + 1)
    except OSError as exc:
        raise _Refused(
            f"the file cannot be read ({exc.strerror or exc}): check that it is still there and readable"
        ) from None
    if len(data) > limit:
        raise _Refused(too_big(len(data)))
    return data


def _caption_too_big(size: int) -> str:
    return (
        f"the caption file is {size / 1024:.0f} KB; the limit is {MAX_CAPTION_BYTES // 1024} KB: "
        "a caption is a line of text, shorten it"
    )


def _link(path: Path, source: Path, caption_source: Path | None) -> None:
    """Link the image (and its caption) to their sources, each link put in place atomically; the caption
    first, the image last, as `_write` does."""
    caption_path = path.with_suffix(CAPTION_SUFFIX)
    image_existed = path.exists() or path.is_symlink()
    caption_existed = caption_path.exists() or caption_path.is_symlink()
    try:
        if caption_source is not None:
            _atomic_symlink(caption_path, caption_source)
        _atomic_symlink(path, source)
    except OSError as exc:
        if caption_source is not None and not image_existed and not caption_existed and not path.is_symlink():
            caption_path.unlink(missing_ok=True)  # the caption landed but its image did not
        raise _Refused(
            f"the link could not be made ({exc.strerror or exc}): check the server's disk, or import with mode='copy'"
        ) from None


def _atomic_symlink(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_empty_tree(folder: Path) -> None:
    """Remove `folder` and the folders under it, as far as they are empty (nothing else is touched)."""
    if folder.is_symlink() or not folder.is_dir():
        return
    for root, dirs, _ in os.walk(folder, topdown=False):
        for name in dirs:
            with contextlib.suppress(OSError):
                (Path(root) / name).rmdir()
    _remove_empty_folder(folder)


def _concepts(folder: Path) -> tuple[list[ImportedConcept], int]:
    """The concepts of the dataset in `folder` as training.data.dataset.scan_dataset finds them, and the
    number of validation images."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    root_images = sum(1 for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    concepts = [ImportedConcept(folder="", name="", repeats=1, images=root_images)] if root_images else []
    validation = 0
    for sub in entries:
        if not sub.is_dir():
            continue
        images, _, _ = _count(sub)
        if sub.name == VALIDATION_FOLDER:
            validation = images
        elif images:
            match = _REPEAT_FOLDER.match(sub.name)
            repeats, name = (int(match.group(1)), match.group(2)) if match else (1, sub.name)
            concepts.append(ImportedConcept(folder=sub.name, name=name, repeats=repeats, images=images))
    return concepts, validation


def _listed(items: Any, limit: int = 30) -> str:
    items = list(items)
    shown = "; ".join(items[:limit])
    return shown + (f"; ... and {len(items) - limit} more" if len(items) > limit else "")


# --- captions ------------------------------------------------------------------------------------
def _dataset_images(folder: Path) -> dict[str, Path]:
    """The dataset's images by their '/'-separated path inside it, hidden entries skipped."""
    found: dict[str, Path] = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(root) / name
            if not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                found[path.relative_to(folder).as_posix()] = path
    return dict(sorted(found.items()))


def _read_caption(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _edit_target(key: Any, images: dict[str, Path]) -> str:
    """The image an edit's key names, as a key of `images`."""
    examples = ", ".join(repr(r) for r in list(images)[:3])
    how = f"give the image's path relative to the dataset folder (this dataset has e.g. {examples})"
    if not isinstance(key, str) or not key.strip():
        raise _Refused(f"the key is empty: {how}")
    given = key.strip().replace("\\", "/")
    if given.startswith("/") or _DRIVE.match(given):
        raise _Refused(f"absolute paths are not taken: {how}")
    parts = [part for part in given.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _Refused(f"'..' is not allowed: only the dataset's own images can be edited; {how}")
    if not parts:
        raise _Refused(f"the key names no file: {how}")
    rel = "/".join(parts)
    if rel in images:
        return rel
    path = PurePosixPath(rel)
    if path.suffix.lower() == CAPTION_SUFFIX:
        images_of = [r for r in images if PurePosixPath(r).with_suffix("") == path.with_suffix("")]
        if images_of:
            raise _Refused(f"name the image, not its caption file: use {images_of[0]!r} as the key")
    near = [
        r
        for r in images
        if r.lower() == rel.lower()
        or PurePosixPath(r).with_suffix("") == path.with_suffix("")
        or PurePosixPath(r).name == path.name
    ]
    if near:
        raise _Refused(f"{rel!r} is not an image of this dataset; did you mean {', '.join(map(repr, near[:3]))}?")
    raise _Refused(f"{rel!r} is not an image of this dataset: {how}")


def _edit_text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Refused("the new caption must be text")
    text = value.strip()
    if not text:
        raise _Refused(
            "the new caption is empty: give the caption text (for an image that should train on the trigger word "
            "alone, give just the trigger word)"
        )
    return text


def _shown(caption: str | None) -> str | None:
    if caption is None or len(caption) <= CAPTION_SHOWN_CHARS:
        return caption
    return caption[: CAPTION_SHOWN_CHARS - 3] + "..."


# --- counting ------------------------------------------------------------------------------------
def _count(folder: Path) -> tuple[int, int, int]:
    """(images, captioned images, total bytes) of the files under `folder`, hidden entries skipped."""
    images = captioned = size = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        names = {f for f in files if not f.startswith(".")}
        for name in names:
            path = Path(root) / name
            try:
                size += path.stat().st_size
            except OSError:
                continue  # removed while we counted
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images += 1
                if path.stem + CAPTION_SUFFIX in names:
                    captioned += 1
    return images, captioned, size
