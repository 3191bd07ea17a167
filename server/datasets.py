"""Datasets uploaded through the server: `<workspace>/datasets/<name>/`, one folder per dataset.

`upload` takes images as base64 with optional captions and judges each file on its own: a
file is saved only when its name is a plain image file name, its bytes decode fully as an
image of the format its suffix says, and it does not replace an existing file unless asked.
A saved image is written atomically together with its same-named `.txt` caption, so the
folder never holds a torn image or an image whose caption is missing half-way; a refused file
leaves nothing behind. The folder layout is the one `training.data.dataset.scan_dataset` reads,
so a config can name the dataset by its name (dataset_path=<name>).

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
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from server.errors import ServiceError
from server.names import checked_name
from training.data.dataset import IMAGE_SUFFIXES
from training.workspace import atomic_output, atomic_write_bytes

MAX_IMAGES_PER_CALL = 200
MAX_IMAGE_BYTES = 50 * 1024 * 1024  # decoded bytes of one image
CAPTION_SUFFIX = ".txt"

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


class _Refused(Exception):
    """One file is refused; the message is its reason."""


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


def _too_big(size: int) -> str:
    return (
        f"the image is {size / 1024 / 1024:.1f} MB; the limit is {MAX_IMAGE_BYTES // 1024 // 1024} MB per image: "
        "downscale it (training uses about 1 megapixel) or save it as JPEG"
    )


def _checked_image(filename: str, data: bytes) -> tuple[int, int]:
    """(width, height) when `data` decodes fully as an image of the format `filename`'s suffix says."""
    from PIL import Image, UnidentifiedImageError  # here, not at import: the server's start-up stays light

    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            image.load()  # decode fully: a truncated file fails here, not at open
            size = image.size
    except Image.DecompressionBombError as exc:
        raise _Refused(f"the image has too many pixels to decode safely ({exc}): downscale it") from None
    except UnidentifiedImageError:
        raise _Refused(
            "the bytes are not an image Pillow can read: send the image file's own bytes (PNG, JPEG or WebP)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _Refused(
            f"the image cannot be decoded fully ({type(exc).__name__}: {exc}); the file is cut short or "
            "corrupt: send the complete file again"
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


def _write(path: Path, data: bytes, caption: str | None) -> None:
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
                caption_tmp.write_bytes(caption.encode("utf-8"))
    except OSError as exc:
        if caption is not None and not image_existed and not caption_existed and not path.exists():
            caption_path.unlink(missing_ok=True)  # the caption landed but its image did not
        raise _Refused(
            f"the file could not be written ({exc.strerror or exc}): check the server's disk, then upload it again"
        ) from None


def _remove_empty_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (someone else wrote there) or already gone
        folder.rmdir()


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
