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

import lzma
import os
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from server.dataset_contents import CAPTION_SUFFIX
from server.dataset_import import MAX_CAPTION_BYTES, MAX_IMPORT_ENTRIES
from server.dataset_schemas import FileOutcome, Refused
from server.errors import ServiceError
from server.image_checks import MAX_DATASET_BYTES, MAX_IMAGE_BYTES, path_part_problem
from server.limits import MB
from training.data.dataset import IMAGE_SUFFIXES

# PNG, JPEG and WebP are compressed already (deflate shrinks them by a few percent) and captions are text
# (3-5:1); deflate reaches about 1030:1 on zeros. An entry over 1 MB that inflates past 100:1 is a bomb.
MAX_RATIO = 100
RATIO_FLOOR = 1 * MB
# The same ratio over all the images and captions of a zip, from 100 MB unpacked on: 20,000 entries of 1 MB of
# zeros each pass the check per entry, and would make the server inflate 19.5 GB sent as 20 MB.
TOTAL_RATIO_FLOOR = 100 * MB
# A central directory record is 46 bytes plus its name (at most 255 bytes here) and extra fields (about
# 40 bytes from common zippers): 1 KB per entry is generous, and bounds what parsing the directory costs.
MAX_DIRECTORY_BYTES = MAX_IMPORT_ENTRIES * 1024
# Each part of a path is at most MAX_NAME_BYTES (255). Datasets are at most two folders deep
# (10_xyz_cat/img001.png): 512 bytes is room for any such path, under macOS' 1024-byte limit for the whole
# path with the workspace's own in front.
MAX_PATH_BYTES = 512
# The records at a zip's end (APPNOTE 4.3.14-16, 4.3.12): the end record (after it a comment of up to
# 64 KB), the zip64 locator before it and the zip64 end record before that; a central directory record.
_END, _END_SIGNATURE, _MAX_COMMENT = struct.Struct("<4s4H2LH"), b"PK\x05\x06", 0xFFFF
_LOCATOR64, _LOCATOR64_SIGNATURE = struct.Struct("<4sLQL"), b"PK\x06\x07"
_END64, _END64_SIGNATURE = struct.Struct("<4sQ2H2L4Q"), b"PK\x06\x06"
_RECORD, _RECORD_SIGNATURE = struct.Struct("<4s24x3H12x"), b"PK\x01\x02"  # keeps the name, extra, comment lengths
# The limit of each kind of entry, the word for it, and what to do when it is over the limit.
_IMAGE = (MAX_IMAGE_BYTES, "image", "downscale it (training uses about 1 megapixel)")
_CAPTION = (MAX_CAPTION_BYTES, "caption", "a caption is a line of text, shorten it")
# What zipfile raises for an entry it cannot unpack; ValueError: UnicodeDecodeError from a local header
# flagged UTF-8 whose name is not UTF-8, lzma.LZMAError: a damaged LZMA stream.
_UNREADABLE = (
    zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError, RuntimeError, OSError, ValueError
)
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
    """The zip file at `path`, its central directory's size checked and its records counted before
    zipfile parses it: parsing costs time and memory per record, and the count the end record declares
    can lie (one that said 1 entry held 390,000: 4 s and 180 MB before the count was refused)."""
    try:
        with path.open("rb") as file:
            start, size = _directory(file)
            _count_records(file, start, size)
    except OSError as exc:
        raise ServiceError(
            f"the zip could not be read back on the server ({exc.strerror or exc}): send it again"
        ) from None
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, NotImplementedError) as exc:
        # NotImplementedError: "zip file version 10.0", a record that asks for a newer unzipper
        raise NotAZip(_damaged(str(exc))) from None
    with archive:
        yield archive


def _directory(file: BinaryIO) -> tuple[int, int]:
    """Where the zip's central directory starts, and its size, from the end-of-central-directory record
    (and the zip64 records right before it, where there are). The directory ends where those records
    start, as zipfile takes it, so bytes put before a zip (a self-extractor's) move it as a whole."""
    length = file.seek(0, os.SEEK_END)
    tail_start = max(0, length - _END.size - _MAX_COMMENT)
    file.seek(tail_start)
    tail = file.read()
    at = tail.rfind(_END_SIGNATURE)
    # The last signature whose record, comment included, fits in the file (a comment may hold the signature).
    while at >= 0 and (at + _END.size > len(tail) or at + _END.size + _END.unpack_from(tail, at)[-1] > len(tail)):
        at = tail.rfind(_END_SIGNATURE, 0, at)
    if at < 0:
        raise NotAZip(
            "the body is not a zip file: send the zip's own bytes (e.g. curl --data-binary @dataset.zip "
            "-H 'Content-Type: application/zip'), not a form upload or another archive format"
        )
    _, _, _, _, entries, size, offset, _ = _END.unpack_from(tail, at)
    end = tail_start + at
    # A zip64 locator right before the end record is read whatever the end record's fields say, as zipfile
    # does (it writes one from 65,535 entries on, with the end record's count at its true value).
    zip64 = _zip64_directory(file, end)
    if zip64 is not None:
        end, size = zip64
    elif entries == 0xFFFF or size == 0xFFFFFFFF or offset == 0xFFFFFFFF:
        raise NotAZip(_damaged("its end record says zip64, but the zip64 records before it are missing"))
    if size > end:
        raise NotAZip(_damaged("its central directory would start before the file does"))
    return end - size, size


def _zip64_directory(file: BinaryIO, end: int) -> tuple[int, int] | None:
    """Where the zip64 end record starts and the directory's size, from the zip64 locator right before
    the end record at `end` and the zip64 end record right before the locator (where zipfile reads it);
    None when there is no locator there."""
    if end < _LOCATOR64.size:
        return None
    file.seek(end - _LOCATOR64.size)
    locator = _LOCATOR64.unpack(file.read(_LOCATOR64.size))
    if locator[0] != _LOCATOR64_SIGNATURE:
        return None
    if locator[1] != 0 or locator[-1] > 1:  # the disk of the zip64 end record, the number of disks
        raise NotAZip(_damaged(f"it says it spans {locator[-1]} disks, and a dataset zip is one file"))
    record_at = end - _LOCATOR64.size - _END64.size
    if record_at < 0:
        raise NotAZip(_damaged("its zip64 end record is missing"))
    file.seek(record_at)
    record = _END64.unpack(file.read(_END64.size))
    if record[0] != _END64_SIGNATURE:
        raise NotAZip(_damaged("its zip64 end record is missing"))
    return record_at, record[8]


def _count_records(file: BinaryIO, start: int, size: int) -> None:
    """Walk the central directory's records (a fixed 46-byte header, then a name, extra fields and a
    comment of the lengths it gives) as zipfile will, refusing the zip past MAX_IMPORT_ENTRIES."""
    if size > MAX_DIRECTORY_BYTES:
        raise ServiceError(_too_many())
    file.seek(start)
    directory = file.read(size)
    if len(directory) < size:
        raise NotAZip(_damaged("its central directory is cut short"))
    at = records = 0
    while at < size:
        if at + _RECORD.size > size or directory[at : at + 4] != _RECORD_SIGNATURE:
            raise NotAZip(_damaged(f"its central directory holds something other than a record at byte {at}"))
        name, extra, comment = _RECORD.unpack_from(directory, at)[1:]
        at += _RECORD.size + name + extra + comment
        records += 1
        if records > MAX_IMPORT_ENTRIES:
            raise ServiceError(_too_many())


def plan(archive: zipfile.ZipFile) -> tuple[list[PlannedImage], list[FileOutcome]]:
    """The images to read, each with its caption, and the outcomes of the entries refused outright;
    a zip that declares more than a dataset may hold is refused whole, before anything is written."""
    outcomes: list[FileOutcome] = []
    files: dict[str, zipfile.ZipInfo] = {}
    folded: dict[str, str] = {}  # the path case-folded -> the first entry's path
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
        if (first := folded.setdefault(rel.casefold(), rel)) != rel:
            # macOS and Windows file systems ignore case: there the second would replace the first.
            reason = f"it differs from {first}, earlier in the zip, only in letter case: give it another name"
            outcomes.append(FileOutcome(filename=rel, saved=False, reason=reason))
            continue
        files[rel] = info

    planned: list[PlannedImage] = []
    image_stems: dict[str, str] = {}  # caption path, case-folded -> the first image that takes it
    for rel, info in files.items():
        path = PurePosixPath(rel)
        caption_rel = str(path.with_suffix(CAPTION_SUFFIX))
        if path.suffix.lower() in IMAGE_SUFFIXES:
            if caption_rel.casefold() in image_stems:
                reason = (
                    f"it would share the caption file {caption_rel} with {image_stems[caption_rel.casefold()]}: "
                    "give it a different name before the suffix"
                )
                outcomes.append(FileOutcome(filename=rel, saved=False, reason=reason))
                continue
            image_stems[caption_rel.casefold()] = rel
            planned.append(PlannedImage(rel, info, files.get(caption_rel)))
    captions = {str(PurePosixPath(p.rel).with_suffix(CAPTION_SUFFIX)) for p in planned if p.caption}
    for rel in files:
        suffix = PurePosixPath(rel).suffix
        if suffix.lower() in IMAGE_SUFFIXES or rel in captions:
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
    _check_unpacked(planned)
    return planned, outcomes


def _check_unpacked(planned: list[PlannedImage]) -> None:
    """Refuse the whole zip when what it would unpack passes a dataset's limit, or inflates like a bomb."""
    entries = [(p.image, _IMAGE) for p in planned] + [(p.caption, _CAPTION) for p in planned if p.caption]
    declared = sum(info.file_size for info, _ in entries)
    if declared > MAX_DATASET_BYTES:
        raise ServiceError(
            f"the zip's images and captions unpack to {declared / MB:.0f} MB, over a dataset's limit of "
            f"{MAX_DATASET_BYTES // MB} MB (LORA_MCP_MAX_DATASET_MB): split them into several datasets"
        )
    # Over what would be inflated: an entry refused from its own declared size or ratio is not.
    inflated = [info for info, limits in entries if _declared_problem(info, *limits) is None]
    declared = sum(info.file_size for info in inflated)
    packed = sum(info.compress_size for info in inflated)
    if declared > TOTAL_RATIO_FLOOR and declared > MAX_RATIO * packed:
        raise ServiceError(
            f"the zip's images and captions would inflate {packed / MB:.1f} MB to {declared / MB:.0f} MB (over "
            f"{MAX_RATIO}:1), which marks a zip bomb (images are compressed already), so nothing was unpacked: "
            "zip the real files"
        )


def read_image(archive: zipfile.ZipFile, item: PlannedImage) -> tuple[bytes, str | None]:
    """The image's bytes and its caption's text, each read only after its declared size and ratio pass."""
    data = _read(archive, item.image, *_IMAGE)
    if item.caption is None:
        return data, None
    raw = _read(archive, item.caption, *_CAPTION)
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
    if len(name.encode("utf-8")) > MAX_PATH_BYTES:
        raise Refused(f"its path is longer than {MAX_PATH_BYTES} bytes: {_ZIP_HINT}")
    for part in parts:
        if problem := path_part_problem(part):
            raise Refused(f"the path's part {part!r} {problem}: {_ZIP_HINT}")
    return "/".join(parts)


def _declared_problem(info: zipfile.ZipInfo, limit: int, what: str, fix: str) -> str | None:
    """Why the entry is refused from its declared size and ratio, before anything is inflated; None if not."""
    if info.file_size > limit:
        size = f"{info.file_size / MB:.1f} MB"
        return f"the {what} {info.filename} is {size} unpacked; the limit is {limit / MB:g} MB: {fix}"
    if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * info.compress_size:
        return (
            f"the {what} {info.filename} would inflate {info.compress_size} bytes to {info.file_size} "
            f"(over {MAX_RATIO}:1), which marks a zip bomb, so it was not unpacked: zip the real file"
        )
    return None


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, what: str, fix: str) -> bytes:
    """The entry's bytes, refused from its declared size and ratio before anything is inflated."""
    if problem := _declared_problem(info, limit, what, fix):
        raise Refused(problem)
    try:
        with archive.open(info) as member:
            # At most the declared size (checked against `limit` above) is inflated: zipfile stops there and
            # checks the CRC, so an entry that inflates past what it declares is cut and fails the CRC.
            return member.read(info.file_size)
    except _UNREADABLE as exc:
        raise Refused(
            f"the {what} {info.filename} cannot be unpacked ({type(exc).__name__}: {exc}): zip it again"
        ) from None


def _damaged(detail: str) -> str:
    return f"the zip is damaged ({detail}): zip the dataset again and send the whole file"


def _too_many() -> str:
    return (
        f"the zip holds more than {MAX_IMPORT_ENTRIES} entries: send a zip with just the dataset's images and "
        "captions, or split them over several zips sent to the same dataset with overwrite=true"
    )
