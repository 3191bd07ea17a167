"""Checking that bytes are a well-formed safetensors file, without torch: the 8-byte header
length, the JSON header of tensors, and data that the tensors' byte ranges cover exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
# Bits per element of each safetensors dtype.
_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


class InvalidSafetensors(ValueError):
    """The bytes are not a well-formed safetensors file; the message says what is wrong."""


def safetensors_metadata(path: Path) -> dict[str, str]:
    """Check that `path` is a well-formed safetensors file and return its __metadata__."""
    return _checked_header(path)[0]


def lora_layout(path: Path) -> str:
    """ "kohya" (`.lora_down.weight` keys) or "diffusers" (`.lora_A.weight`) for a well-formed file."""
    names = _checked_header(path)[1]
    return "kohya" if any(".lora_down." in name for name in names) else "diffusers"


def _checked_header(path: Path) -> tuple[dict[str, str], list[str]]:
    """(__metadata__, tensor names) of `path`, once it is checked to be a well-formed safetensors file.

    Reads only the header: an 8-byte little-endian header length, a JSON object of tensors
    {name: {dtype, shape, data_offsets}} (and an optional __metadata__ of strings), then the data,
    which the tensors' byte ranges must cover exactly, each one the size its dtype and shape say.
    """
    size = path.stat().st_size
    if size < 8:
        raise InvalidSafetensors(f"it is {size} bytes, shorter than the 8-byte header length")
    with path.open("rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if header_size < 2 or header_size > MAX_HEADER_BYTES or 8 + header_size > size:
            raise InvalidSafetensors(
                f"its first 8 bytes give a header of {header_size} bytes, impossible in a file of {size} bytes"
            )
        raw = f.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidSafetensors("its header is not JSON") from None
    if not isinstance(header, dict):
        raise InvalidSafetensors("its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidSafetensors("its __metadata__ is not an object of strings")
    if not header:
        raise InvalidSafetensors("it holds no tensors")
    data_size = size - 8 - header_size
    ranges = []
    for name, info in header.items():
        ranges.append((*_tensor_range(name, info, data_size), name))
    ranges.sort()
    position = 0
    for begin, end, name in ranges:
        if begin != position:
            problem = "overlaps the one before" if begin < position else f"leaves a gap at byte {position}"
            raise InvalidSafetensors(f"tensor {name!r} {problem} in the data")
        position = end
    if position != data_size:
        raise InvalidSafetensors(f"the tensors cover {position} bytes of data, but the file holds {data_size}")
    return metadata, list(header)


def _tensor_range(name: str, info: Any, data_size: int) -> tuple[int, int]:
    if not isinstance(info, dict):
        raise InvalidSafetensors(f"tensor {name!r} is not described by an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPE_BITS:
        raise InvalidSafetensors(f"tensor {name!r} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_whole(n) and n >= 0 for n in shape):
        raise InvalidSafetensors(f"tensor {name!r} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(n) for n in offsets)):
        raise InvalidSafetensors(f"tensor {name!r} has malformed data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise InvalidSafetensors(
            f"tensor {name!r} has data_offsets {offsets} outside the {data_size} bytes of data in the file"
        )
    bits = math.prod(shape) * _DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        raise InvalidSafetensors(
            f"tensor {name!r} ({dtype}, shape {shape}) needs {bits / 8:g} bytes but its data_offsets span {end - begin}"
        )
    return begin, end


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
