"""A zip of images and captions for a dataset (the body of POST /datasets/<name> over HTTP), read
without trusting what it says of itself.

Each entry of a zip names its own path, size and kind, and each can be an attack: `../x` or `/etc/x`
paths, drive letters, symbolic links, a few kilobytes that inflate to gigabytes (a zip bomb), millions
of entries. So nothing is extracted the way the zip says: the central directory's size is checked before
it is parsed; each entry's path is judged as a path inside the dataset (relative, plain names, no '..');
links and other non-files are refused; an entry is read only when it is an image or an image's caption,
its declared size is within an upload's limits and its compression ratio is not a bomb's, and then
with a read bounded by those limits. `DatasetService.upload_zip` judges what is read as it judges an
uploaded image, and writes it the same way.

The layout is import-dataset's: images with same-named `.txt` captions at the root, in kohya `N_name`
concept folders or in `validation/`. Hidden entries (`.DS_Store`, macOS' `__MACOSX/._*`) are skipped.
"""

from __future__ import annotations

import re
import stat
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from server.dataset_contents import CAPTION_SUFFIX
from server.dataset_import import MAX_CAPTION_BYTES, MAX_IMPORT_ENTRIES
from server.dataset_schemas import FileOutcome, Refused
from server.errors import ServiceError
from server.image_checks import MAX_DATASET_BYTES, MAX_IMAGE_BYTES
from server.limits import MB
from server.names import plain_filename_problem
from training.data.dataset import IMAGE_SUFFIXES

# PNG, JPEG and WebP are compressed already (deflate shrinks them by a few percent) and captions are text
# (3-5:1); deflate reaches about 1030:1 on zeros. An entry over 1 MB that inflates past 100:1 is a bomb.
MAX_RATIO = 100
RATIO_FLOOR = 1 * MB
# A central directory record is 46 bytes plus its name (at most 255 bytes here) and extra fields (about
# 40 bytes from common zippers): 1 KB per entry is generous, and bounds what parsing the directory costs.
MAX_DIRECTORY_BYTES = MAX_IMPORT_ENTRIES * 1024
_DRIVE = re.compile(r"^[A-Za-z]:")
_ZIP_HINT = "zip the dataset folder's contents with paths relative to it (e.g. 10_xyz_cat/img001.png)"


class NotAZip(ServiceError):
    """The bytes are not a zip file (the HTTP API answers 400)."""


@dataclass
class PlannedImage:
    """An image entry to read, with its caption entry when the zip has one beside it."""

    rel: str  # its path inside the dataset, '/'-separated
    image: zipfile.ZipInfo
    caption: zipfile.ZipInfo | None


@contextmanager
def opened(path: Path) -> Iterator[zipfile.ZipFile]:
    """The zip file at `path`, its central directory checked for size before it is parsed."""
    try:
        with path.open("rb") as file:
            # zipfile's own reader of the end record (handles zip64 and comments): parsing the central
            # directory costs memory per entry, so its declared size and count are checked first.
            end = zipfile._EndRecData(file)
    except OSError as exc:
        raise ServiceError(
            f"the zip could not be read back on the server ({exc.strerror or exc}): send it again"
        ) from None
    if end is None:
        raise NotAZip(
            "the body is not a zip file: send the zip's own bytes (e.g. curl --data-binary @dataset.zip "
            "-H 'Content-Type: application/zip'), not a form upload or another archive format"
        )
    if end[zipfile._ECD_SIZE] > MAX_DIRECTORY_BYTES or end[zipfile._ECD_ENTRIES_TOTAL] > MAX_IMPORT_ENTRIES:
        raise ServiceError(_too_many())
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise NotAZip(f"the zip is damaged ({exc}): zip the dataset again and send the whole file") from None
    with archive:
        if len(archive.infolist()) > MAX_IMPORT_ENTRIES:
            raise ServiceError(_too_many())
        yield archive


def plan(archive: zipfile.ZipFile) -> tuple[list[PlannedImage], list[FileOutcome]]:
    """The images to read, each with its caption, and the outcomes of the entries refused outright;
    a zip that declares more than a dataset may hold is refused whole, before anything is written."""
    outcomes: list[FileOutcome] = []
    files: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        try:
            rel = _entry_path(info)
        except Refused as refusal:
            outcomes.append(FileOutcome(filename=info.filename, saved=False, reason=str(refusal)))
            continue
        if rel is None:
            continue
        if rel in files:
            reason = "the path appears twice in the zip; only the first entry is taken"
            outcomes.append(FileOutcome(filename=rel, saved=False, reason=reason))
            continue
        files[rel] = info

    planned: list[PlannedImage] = []
    image_stems: dict[str, str] = {}  # caption path -> the first image that takes it
    for rel, info in files.items():
        path = PurePosixPath(rel)
        caption_rel = str(path.with_suffix(CAPTION_SUFFIX))
        if path.suffix.lower() in IMAGE_SUFFIXES:
            if caption_rel in image_stems:
                reason = (
                    f"it would share the caption file {caption_rel} with {image_stems[caption_rel]}: give it a "
                    "different name before the suffix"
                )
                outcomes.append(FileOutcome(filename=rel, saved=False, reason=reason))
                continue
            image_stems[caption_rel] = rel
            planned.append(PlannedImage(rel, info, files.get(caption_rel)))
    for rel in files:
        suffix = PurePosixPath(rel).suffix
        if suffix.lower() in IMAGE_SUFFIXES or rel in image_stems:
            continue
        reason = (
            "skipped: a caption without a same-named image (.jpg/.jpeg/.png/.webp) beside it"
            if suffix == CAPTION_SUFFIX
            else "skipped: not an image (.jpg/.jpeg/.png/.webp) or a same-named .txt caption; datasets take only those"
        )
        outcomes.append(FileOutcome(filename=rel, saved=False, reason=reason))

    if not planned and not outcomes:
        raise ServiceError(
            "the zip holds no files (hidden entries are skipped): put the images (.jpg/.jpeg/.png/.webp, each with "
            f"a same-named .txt caption) in it; {_ZIP_HINT}"
        )
    declared = sum(p.image.file_size + (p.caption.file_size if p.caption else 0) for p in planned)
    if declared > MAX_DATASET_BYTES:
        raise ServiceError(
            f"the zip's images and captions unpack to {declared / MB:.0f} MB, over a dataset's limit of "
            f"{MAX_DATASET_BYTES // MB} MB (LORA_MCP_MAX_DATASET_MB): split them into several datasets"
        )
    return planned, outcomes


def read_image(archive: zipfile.ZipFile, item: PlannedImage) -> tuple[bytes, str | None]:
    """The image's bytes and its caption's text, each read only after its declared size and ratio pass."""
    data = _read(archive, item.image, MAX_IMAGE_BYTES, "image", "downscale it (training uses about 1 megapixel)")
    if item.caption is None:
        return data, None
    raw = _read(archive, item.caption, MAX_CAPTION_BYTES, "caption", "a caption is a line of text, shorten it")
    try:
        return data, raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Refused(
            f"its caption {item.caption.filename} is not UTF-8 text: save it as UTF-8, then zip it again"
        ) from None


def _entry_path(info: zipfile.ZipInfo) -> str | None:
    """The entry's path inside the dataset, None for a folder or a hidden entry; Refused when the entry is
    not a plain file at a plain relative path."""
    name = info.filename
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise Refused(f"it is an absolute path, which would land outside the dataset: {_ZIP_HINT}")
    parts = [part for part in name.rstrip("/").split("/") if part != "."]
    if ".." in parts:
        raise Refused(f"its path climbs out of the dataset with '..': {_ZIP_HINT}")
    kind = stat.S_IFMT(info.external_attr >> 16)  # the Unix file type, where a Unix zipper recorded one
    if kind == stat.S_IFLNK:
        raise Refused("it is a symbolic link: datasets take files only; zip the files themselves (no --symlinks)")
    if info.is_dir() or any(part.startswith(".") for part in parts):
        return None
    if kind not in (0, stat.S_IFREG):
        raise Refused("it is not a regular file (a device, pipe or socket): leave it out of the zip")
    if info.flag_bits & 0x1:
        raise Refused("it is encrypted: zip the dataset without a password")
    for part in parts:
        if problem := plain_filename_problem(part):
            raise Refused(f"the path's part {part!r} {problem}: {_ZIP_HINT}")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in part):
            raise Refused(f"the path contains control characters: {_ZIP_HINT}")
    return "/".join(parts)


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, what: str, fix: str) -> bytes:
    """The entry's bytes, refused from its declared size and ratio before anything is inflated."""
    if info.file_size > limit:
        raise Refused(
            f"the {what} {info.filename} is {info.file_size / MB:.1f} MB unpacked; the limit is "
            f"{limit / MB:g} MB: {fix}"
        )
    if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * info.compress_size:
        raise Refused(
            f"the {what} {info.filename} would inflate {info.compress_size} bytes to {info.file_size} "
            f"(over {MAX_RATIO}:1), which marks a zip bomb, so it was not unpacked: zip the real file"
        )
    try:
        with archive.open(info) as member:
            # zipfile stops at the declared size and checks the CRC there: at most `limit` bytes come out.
            return member.read(limit)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as exc:
        raise Refused(
            f"the {what} {info.filename} cannot be unpacked ({type(exc).__name__}: {exc}): zip it again"
        ) from None


def _too_many() -> str:
    return (
        f"the zip holds more than {MAX_IMPORT_ENTRIES} entries: send a zip with just the dataset's images and "
        "captions, or split them over several zips sent to the same dataset with overwrite=true"
    )
