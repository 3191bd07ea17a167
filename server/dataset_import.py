"""`import_folder` brings in a kohya-style folder from the server's disk (root images, `N_name`
repeat folders, concept folders, `validation/`), copying or linking each image that passes the
same checks as an upload (server.image_checks), with its caption; a file or link whose target lies
outside the workspace and LORA_MCP_ALLOWED_DIRS is refused, never followed.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from server.dataset_contents import CAPTION_SUFFIX, count_dataset, remove_empty_folder
from server.dataset_schemas import FileOutcome, ImportedConcept, ImportResult, Refused
from server.errors import ServiceError, WorkspaceStateError
from server.image_checks import check_room, checked_image, read_image_file, read_regular_file, write_image_with_caption
from server.paths import ALLOWED_DIRS_ENV, allowed_roots, check_user_path
from training.data.dataset import CLASS_FOLDER, IMAGE_SUFFIXES, VALIDATION_FOLDER

MAX_CAPTION_BYTES = 1024 * 1024  # one imported caption file
MAX_IMPORT_ENTRIES = 20_000  # files and folders one import walks through
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")  # as training.data.dataset reads it


@dataclass
class _PlannedImage:
    """An image found by an import, with its caption file when it has one (both with links resolved)."""

    rel: str  # relative path inside the source, '/'-separated
    source: Path
    caption_rel: str | None
    caption_source: Path | None


def import_folder(
    workspace: Path,
    name: str,
    folder: Path,
    source_path: str,
    mode: Literal["copy", "link"],
    overwrite: bool,
) -> ImportResult:
    """Bring the folder `source_path` into the dataset `name` at `folder`, file by file (see
    `DatasetService.import_folder`)."""
    if mode not in ("copy", "link"):
        raise ServiceError(
            f"mode {mode!r} is not known: use 'copy' (the dataset gets its own copies) or 'link' (the dataset "
            "links to the files where they are)"
        )
    source = _checked_source(workspace, source_path)
    roots = allowed_roots(workspace)
    target = folder.resolve()
    if target == source or target.is_relative_to(source) or source.is_relative_to(target):
        raise ServiceError(
            f"source_path {source_path!r} ({source}) and the dataset folder {folder} contain one another: "
            "give the folder that holds just the images and their captions, or another dataset_name"
        )
    if folder.exists() or folder.is_symlink():
        if not folder.is_dir():
            raise WorkspaceStateError(f"{folder} exists but is not a folder: remove it or choose another dataset_name")
        if not overwrite:
            images, _, _ = count_dataset(folder)
            raise WorkspaceStateError(
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
        next_step=_import_next_step(name, folder, mode, concepts, refused),
    )


def _checked_source(workspace: Path, source_path: str) -> Path:
    if not isinstance(source_path, str) or not source_path.strip():
        raise ServiceError("source_path is empty: give the absolute path of a folder on the server")
    given = Path(source_path.strip()).expanduser()
    source = (given if given.is_absolute() else workspace / given).resolve()
    # Outside the allowed folders is refused before anything else is said about the path.
    check_user_path("source_path", str(source), workspace)
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


def _import_next_step(name: str, folder: Path, mode: str, concepts: list[ImportedConcept], refused: int) -> str:
    images, captioned, _ = count_dataset(folder)
    text = (
        f"Dataset {name!r} now holds {images} image(s), {captioned} with a caption. "
        f"Create a training config with create-training-config and dataset_path={name!r}."
    )
    if len(concepts) > 1:
        text += (
            " It has several concepts: each trains on its folder's name as trigger word unless the config's "
            "trigger_words maps the folder to another, or its captions all start with a trigger of their own "
            "(get-dataset-info says which trigger each concept gets, and why)."
        )
    if any(c.repeats < 1 for c in concepts):
        text += " A folder with repeat count 0 (0_name) cannot be trained: rename it to 1_name or more."
    if captioned < images:
        text += " Images without a caption train on the trigger word alone; add captions with update-captions."
    if mode == "link":
        text += (
            " The dataset links to the source files: keep them where they are (delete-dataset removes only the links)."
        )
    if refused:
        text += (
            f" {refused} file(s) were not imported (see files[].reason): fix the images in the source folder "
            "and import again with overwrite=true; imported files stay."
        )
    return text


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
        data = read_image_file(item.source)
        if mode == "copy":
            check_room(folder, len(data))
        width, height = checked_image(item.rel, data, imported=True)
    except Refused as refusal:
        reason = str(refusal) + ("; its caption was not imported either" if item.caption_rel else "")
        return [FileOutcome(filename=item.rel, saved=False, reason=reason)]

    extra: list[FileOutcome] = []
    caption: bytes | None = None
    if item.caption_source is not None and item.caption_rel is not None:
        try:
            caption = read_regular_file(item.caption_source, MAX_CAPTION_BYTES, _caption_too_big)
        except Refused as refusal:
            extra.append(
                FileOutcome(filename=item.caption_rel, saved=False, reason=f"the caption was not imported: {refusal}")
            )

    path = folder / item.rel
    try:
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise Refused(
                    "a file with this path is already in the dataset: import with overwrite=true to replace it"
                )
            if path.is_dir() and not path.is_symlink():
                raise Refused("a folder with this path is in the dataset: remove it there, then import again")
        if mode == "copy":
            write_image_with_caption(path, data, caption)
        else:
            _link(path, item.source, item.caption_source if caption is not None else None)
    except Refused as refusal:
        return [FileOutcome(filename=item.rel, saved=False, reason=str(refusal)), *extra]
    captioned = path.with_suffix(CAPTION_SUFFIX).is_file()
    return [FileOutcome(filename=item.rel, saved=True, width=width, height=height, captioned=captioned), *extra]


def _caption_too_big(size: int) -> str:
    return (
        f"the caption file is {size / 1024:.0f} KB; the limit is {MAX_CAPTION_BYTES // 1024} KB: "
        "a caption is a line of text, shorten it"
    )


def _link(path: Path, source: Path, caption_source: Path | None) -> None:
    """Link the image (and its caption) to their sources, each link put in place atomically; the caption
    first, the image last, as `write_image_with_caption` does."""
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
        raise Refused(
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
    remove_empty_folder(folder)


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
        images, _, _ = count_dataset(sub)
        if sub.name == VALIDATION_FOLDER:
            validation = images
        elif images and sub.name != CLASS_FOLDER:  # class images are prior preservation's, not a concept
            match = _REPEAT_FOLDER.match(sub.name)
            repeats, name = (int(match.group(1)), match.group(2)) if match else (1, sub.name)
            concepts.append(ImportedConcept(folder=sub.name, name=name, repeats=repeats, images=images))
    return concepts, validation


def _listed(items: Any, limit: int = 30) -> str:
    items = list(items)
    shown = "; ".join(items[:limit])
    return shown + (f"; ... and {len(items) - limit} more" if len(items) > limit else "")
