"""`update_captions` rewrites the captions of a dataset (by file, by find/replace, or by making sure a
trigger word is there), each `.txt` atomically."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from server.dataset_contents import CAPTION_SUFFIX
from server.dataset_schemas import CAPTION_SHOWN_CHARS, CaptionOutcome, CaptionUpdateResult, Refused
from server.errors import ServiceError, WorkspaceStateError
from training.data.dataset import IMAGE_SUFFIXES, with_trigger_first
from training.workspace import atomic_write_text

_DRIVE = re.compile(r"^[A-Za-z]:")


def update_captions(
    name: str,
    folder: Path,
    edits: dict[str, str] | None,
    find: str | None,
    replace: str | None,
    trigger_word: str | None,
) -> CaptionUpdateResult:
    """`DatasetService.update_captions` for the existing dataset `name` at `folder`."""
    trigger = _checked_changes(edits, find, replace, trigger_word)
    images = _dataset_images(folder)
    if not images:
        raise WorkspaceStateError(
            f"dataset {name!r} holds no images, so it has no captions to update: add images with "
            "upload-dataset or import-dataset first"
        )
    draft = _CaptionDraft(images)
    draft.apply_edits(edits or {})
    if find is not None or trigger is not None:
        draft.apply_to_every_caption(find, replace, trigger)
    draft.write()
    outcomes = draft.outcomes()
    changed = sum(o.changed for o in outcomes)
    failures = sum(o.reason is not None for o in outcomes)
    refused = len(draft.refusals) + failures
    return CaptionUpdateResult(
        dataset_name=name,
        path=str(folder),
        changed=changed,
        unchanged=len(outcomes) - changed - failures,
        refused=refused,
        files=outcomes + draft.refusals,
        next_step=_captions_next_step(name, changed, refused, find is not None),
    )


def _checked_changes(edits: Any, find: Any, replace: Any, trigger_word: Any) -> str | None:
    """Refuse a request that cannot be carried out as a whole; the trigger word with its spaces normalised."""
    if edits is not None and not isinstance(edits, dict):
        raise ServiceError(
            "edits must be an object mapping an image's path in the dataset to its new caption, e.g. "
            '{"img1.png": "xyz_cat, a cat on a sofa", "10_xyz_cat/img2.png": "..."}'
        )
    if (find is None) != (replace is None):
        raise ServiceError("find and replace go together: give both (replace='' deletes the found text), or neither")
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
        raise ServiceError("nothing to do: give edits ({image path: new caption}), find and replace, or trigger_word")
    return trigger


class _CaptionDraft:
    """A dataset's captions as one update_captions call changes them: each caption file is read once,
    changed in memory by the edits, then find/replace, then the trigger word, and written once."""

    def __init__(self, images: dict[str, Path]):
        self.images = images
        self.caption_of = {rel: path.with_suffix(CAPTION_SUFFIX) for rel, path in images.items()}
        self.original: dict[Path, str | None] = {}  # caption file -> its text (stripped), None without one
        self.current: dict[Path, str | None] = {}  # caption file -> its text after this call
        self.looked_at: list[str] = []  # images whose caption this call looked at, in order
        self.refusals: list[CaptionOutcome] = []
        self.failed: dict[Path, str] = {}
        self.written: set[Path] = set()

    def text_of(self, caption_path: Path) -> str | None:
        if caption_path not in self.original:
            self.original[caption_path] = _read_caption(caption_path)
        return self.current.get(caption_path, self.original[caption_path])

    def apply_edits(self, edits: dict[Any, Any]) -> None:
        for key, new_caption in edits.items():
            try:
                rel = _edit_target(key, self.images)
                if rel in self.looked_at:
                    raise Refused(f"{rel} is already edited by an earlier key of edits: give each image once")
                text = _edit_text(new_caption)
            except Refused as refusal:
                self.refusals.append(CaptionOutcome(filename=str(key), changed=False, reason=str(refusal)))
                continue
            self.text_of(self.caption_of[rel])  # keeps the original, to tell a change from a rewrite
            self.current[self.caption_of[rel]] = text
            self.looked_at.append(rel)

    def apply_to_every_caption(self, find: str | None, replace: str | None, trigger: str | None) -> None:
        self.looked_at += [rel for rel in self.images if rel not in self.looked_at]
        for caption_path in dict.fromkeys(self.caption_of.values()):  # each caption file once
            text = self.text_of(caption_path)
            if find is not None and text is not None:
                text = text.replace(find, replace).strip()
            if trigger is not None:
                text = with_trigger_first(text or "", trigger)
            self.current[caption_path] = text

    def write(self) -> None:
        """Write each changed caption; one that cannot be written keeps its old text and says why."""
        for caption_path, text in self.current.items():
            if text is None or text == self.original[caption_path]:
                continue
            try:
                atomic_write_text(caption_path, text)
                self.written.add(caption_path)
            except OSError as exc:
                self.failed[caption_path] = (
                    f"the caption could not be written ({exc.strerror or exc}): check the server's disk and the "
                    f"permissions of {caption_path.parent}, then try again"
                )
                self.current[caption_path] = self.original[caption_path]

    def outcomes(self) -> list[CaptionOutcome]:
        return [
            CaptionOutcome(
                filename=rel,
                changed=self.caption_of[rel] in self.written,
                caption=_shown(self.current.get(self.caption_of[rel], self.original.get(self.caption_of[rel]))),
                reason=self.failed.get(self.caption_of[rel]),
            )
            for rel in self.looked_at
        ]


def _captions_next_step(name: str, changed: int, refused: int, searched: bool) -> str:
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
        raise Refused(f"the key is empty: {how}")
    given = key.strip().replace("\\", "/")
    if given.startswith("/") or _DRIVE.match(given):
        raise Refused(f"absolute paths are not taken: {how}")
    parts = [part for part in given.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise Refused(f"'..' is not allowed: only the dataset's own images can be edited; {how}")
    if not parts:
        raise Refused(f"the key names no file: {how}")
    rel = "/".join(parts)
    if rel in images:
        return rel
    path = PurePosixPath(rel)
    if path.suffix.lower() == CAPTION_SUFFIX:
        images_of = [r for r in images if PurePosixPath(r).with_suffix("") == path.with_suffix("")]
        if images_of:
            raise Refused(f"name the image, not its caption file: use {images_of[0]!r} as the key")
    near = [
        r
        for r in images
        if r.lower() == rel.lower()
        or PurePosixPath(r).with_suffix("") == path.with_suffix("")
        or PurePosixPath(r).name == path.name
    ]
    if near:
        raise Refused(f"{rel!r} is not an image of this dataset; did you mean {', '.join(map(repr, near[:3]))}?")
    raise Refused(f"{rel!r} is not an image of this dataset: {how}")


def _edit_text(value: Any) -> str:
    if not isinstance(value, str):
        raise Refused("the new caption must be text")
    text = value.strip()
    if not text:
        raise Refused(
            "the new caption is empty: give the caption text (for an image that should train on the trigger word "
            "alone, give just the trigger word)"
        )
    return text


def _shown(caption: str | None) -> str | None:
    if caption is None or len(caption) <= CAPTION_SHOWN_CHARS:
        return caption
    return caption[: CAPTION_SHOWN_CHARS - 3] + "..."
