"""The checks an image file passes before it enters a dataset, the same for an upload (base64) and an
import (a file on the server's disk): a plain image file name, bytes that decode fully as an image of the
format its suffix says (refused from Pillow's pixel limit on, before decoding), the size limits of one
image and of the whole dataset, and reads of regular files only. A file that passes is written atomically
together with its same-named `.txt` caption, so the folder never holds a torn image or an image whose
caption is missing half-way. Each check raises `Refused` with the reason and what to do.

Pillow is imported inside the function that uses it: the server's start-up stays light.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

from server.dataset_contents import CAPTION_SUFFIX
from server.dataset_schemas import Refused, UploadImage
from server.limits import count, megabytes
from server.names import plain_filename_problem
from training.data.dataset import IMAGE_SUFFIXES
from training.workspace import atomic_output, atomic_write_bytes

MAX_IMAGE_BYTES = megabytes("LORA_MCP_MAX_IMAGE_MB", 50)  # decoded bytes of one image
MAX_DATASET_BYTES = megabytes("LORA_MCP_MAX_DATASET_MB", 20 * 1024)  # all files of one dataset
# Pixels an image may have: Pillow's own bomb limit (about 89 megapixels) unless the operator sets one.
MAX_IMAGE_PIXELS = count("LORA_MCP_MAX_IMAGE_PIXELS", None)

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
MAX_NAME_BYTES = 255  # Linux and macOS refuse a longer file or folder name


def check_filename(filename: str) -> None:
    """A plain image file name, or one with one folder level of the dataset ('10_cat/a.png', 'validation/b.png',
    'class/c.png': the layout training reads); each part is checked as a plain name."""
    plain = "use a plain file name such as 'img001.png', or one folder and a name such as '10_cat/img001.png'"
    if not isinstance(filename, str) or not filename.strip():
        raise Refused(f"the filename is empty: {plain}")
    if "\\" in filename:
        raise Refused(f"the filename contains a backslash: separate a folder from the name with '/' ({plain})")
    if filename.startswith("/"):
        raise Refused(f"the filename is an absolute path, which would land outside the dataset: {plain}")
    parts = filename.split("/")
    if "" in parts:
        raise Refused(f"the filename has an empty part (a '/' at its end, or '//'): {plain}")
    if len(parts) > 2:
        raise Refused(f"the filename has {len(parts) - 1} folder levels; an upload takes one folder level: {plain}")
    for part in parts:
        if problem := path_part_problem(part):
            raise Refused(f"the filename's part {part!r} {problem}: {plain}")
    if not Path(parts[-1]).stem:
        raise Refused(plain)
    suffix = Path(parts[-1]).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise Refused(
            f"{suffix or 'a name without a suffix'} is not taken: an image's name must end in "
            f"{', '.join(IMAGE_SUFFIXES[:-1])} or {IMAGE_SUFFIXES[-1]} (captions go in the caption field, "
            "not as .txt files)"
        )


def path_part_problem(part: str) -> str | None:
    """Why `part` cannot be a file or folder name in a dataset, said after "the part 'x'", or None."""
    if problem := plain_filename_problem(part):
        return problem
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in part):
        return "contains control characters"
    if len(part.encode("utf-8", errors="replace")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes, which no file system takes"
    return None


def decoded_bytes(image: UploadImage) -> bytes:
    if image.content is not None and image.data is not None and image.content != image.data:
        raise Refused("both content and data are given and differ: give the base64 in one of them")
    text = image.content if image.content is not None else image.data
    if text is None:
        raise Refused("no image bytes: give the file's base64 in content")
    text = _DATA_URL.sub("", text.strip(), count=1)
    try:
        raw = _WHITESPACE.sub(b"", text.encode("ascii"))
    except UnicodeEncodeError:
        raise Refused(_bad_base64("it holds non-ASCII characters")) from None
    if not raw:
        raise Refused("content is empty: give the image file's bytes as base64")
    if len(raw) // 4 * 3 > MAX_IMAGE_BYTES + 3:  # over the limit before decoding it
        raise Refused(_too_big(len(raw) // 4 * 3))
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Refused(_bad_base64(str(exc))) from None
    if len(data) > MAX_IMAGE_BYTES:
        raise Refused(_too_big(len(data)))
    return data


def _bad_base64(detail: str) -> str:
    return (
        f"content is not valid base64 ({detail}): encode the whole file with standard base64 "
        "(A-Z, a-z, 0-9, '+', '/', '=' padding), e.g. base64.b64encode(open(path, 'rb').read()).decode()"
    )


def dataset_bytes(folder: Path) -> int:
    """The bytes of the dataset's files, as its size limit counts them: links count as nothing."""
    if not folder.is_dir():
        return 0
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def check_room(folder: Path, size: int, used: int | None = None) -> None:
    """Refuse a file that would take the dataset past MAX_DATASET_BYTES; `used`: the dataset's bytes where
    the caller keeps count of them (a zip of 20,000 images), else they are counted here."""
    if used is None:
        used = dataset_bytes(folder)
    if used + size > MAX_DATASET_BYTES:
        raise Refused(
            f"the dataset would pass its size limit of {MAX_DATASET_BYTES // 2**20} MB "
            f"({used // 2**20} MB used; LORA_MCP_MAX_DATASET_MB sets the limit): make room or use another dataset_name"
        )


def _too_big(size: int) -> str:
    return (
        f"the image is {size / 1024 / 1024:.1f} MB; the limit is {MAX_IMAGE_BYTES // 1024 // 1024} MB per image "
        "(LORA_MCP_MAX_IMAGE_MB): "
        "downscale it (training uses about 1 megapixel) or save it as JPEG"
    )


def checked_image(filename: str, data: bytes, imported: bool = False) -> tuple[int, int]:
    """(width, height) when `data` decodes fully as an image of the format `filename`'s suffix says;
    `imported`: the advice in a refusal is for a file on the server's disk, not for an upload."""
    from PIL import Image, UnidentifiedImageError  # here, not at import: the server's start-up stays light

    from training.image_files import upright_size

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            image_format = image.format
            size = upright_size(image)  # as displayed: a phone's portrait photo is stored landscape
            # Pillow only warns between its pixel limit and twice that; refuse from the limit, before decoding.
            limit = MAX_IMAGE_PIXELS or Image.MAX_IMAGE_PIXELS
            if limit and image.width * image.height > limit:
                raise Image.DecompressionBombError(f"{image.width}x{image.height} is more than {limit} pixels")
            image.load()  # decode fully: a truncated file fails here, not at open
    except Image.DecompressionBombError as exc:
        raise Refused(f"the image has too many pixels to decode safely ({exc}): downscale it") from None
    except UnidentifiedImageError:
        fix = (
            "replace it with a PNG, JPEG or WebP image, or remove it from the folder"
            if imported
            else "send the image file's own bytes (PNG, JPEG or WebP)"
        )
        raise Refused(f"the bytes are not an image Pillow can read: {fix}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        fix = "replace it with a complete copy" if imported else "send the complete file again"
        raise Refused(
            f"the image cannot be decoded fully ({type(exc).__name__}: {exc}); the file is cut short or corrupt: {fix}"
        ) from None
    suffix = Path(filename).suffix.lower()
    if image_format not in _FORMATS_BY_SUFFIX[suffix]:
        right = _SUFFIX_BY_FORMAT.get(image_format or "")
        if right is None:
            raise Refused(
                f"the bytes are a {image_format or 'unknown'} image, which datasets do not take: "
                "convert it to PNG, JPEG or WebP"
            )
        raise Refused(
            f"the bytes are a {image_format} image but the name ends in {Path(filename).suffix}: "
            f"rename it to {Path(filename).stem}{right}"
        )
    return size


def write_image_with_caption(path: Path, data: bytes, caption: str | bytes | None) -> None:
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
        raise Refused(
            f"the file could not be written ({exc.strerror or exc}): check the server's disk, then upload it again"
        ) from None


def read_regular_file(path: Path, limit: int, too_big: Callable[[int], str]) -> bytes:
    """The bytes of the regular file `path` (not a link, pipe or device), at most `limit` of them."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        with open(os.open(path, flags), "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise Refused("it is not a regular file: remove it from the source folder")
            if info.st_size > limit:
                raise Refused(too_big(info.st_size))
            data = file.read(limit + 1)
    except OSError as exc:
        raise Refused(
            f"the file cannot be read ({exc.strerror or exc}): check that it is still there and readable"
        ) from None
    if len(data) > limit:
        raise Refused(too_big(len(data)))
    return data


def read_image_file(path: Path) -> bytes:
    """The bytes of the image file `path` on the server's disk, refused past MAX_IMAGE_BYTES as an upload is."""
    return read_regular_file(path, MAX_IMAGE_BYTES, _too_big)
