"""Checking that a file is a well-formed safetensors file, without torch: the safetensors library's own
reader (`safe_open` with the numpy framework, which reads the header and never imports torch) checks
the header length, the JSON of tensors and that their byte ranges cover the data; its error is said
here in words that tell what is wrong with the file."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

# safetensors' error texts (0.4-0.8) -> what they mean for the file; its own text follows in brackets.
_REASONS = (
    ("header too small", "it is shorter than the 8-byte header length"),
    ("invalid header length", "its first 8 bytes give a header length impossible in a file of this size"),
    ("invalid json in header", "its header is not the JSON object of tensors and strings a safetensors file has"),
    ("not fully covered", "its tensors do not cover its data: the file is cut short or corrupt"),
    ("invalid shape, data type, or offset", "a tensor's dtype and shape do not match its data_offsets"),
    ("invalid offset", "a tensor's data overlaps the one before or leaves a gap in the data"),
)


class InvalidSafetensors(ValueError):
    """The bytes are not a well-formed safetensors file; the message says what is wrong."""


def safetensors_metadata(path: Path) -> dict[str, str]:
    """Check that `path` is a well-formed safetensors file and return its __metadata__."""
    return _checked(path)[0]


def lora_layout(path: Path) -> str:
    """ "kohya" (`.lora_down.weight` keys) or "diffusers" (`.lora_A.weight`) for a well-formed file."""
    names = _checked(path)[1]
    return "kohya" if any(".lora_down." in name for name in names) else "diffusers"


def _checked(path: Path) -> tuple[dict[str, str], list[str]]:
    """(__metadata__, tensor names) of `path`, once the safetensors library has read its header."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata, names = f.metadata() or {}, list(f.keys())
    except SafetensorError as exc:
        detail = str(exc).removeprefix("Error while deserializing header: ")
        reason = next((said for found, said in _REASONS if found in detail.lower()), "it cannot be read")
        raise InvalidSafetensors(f"{reason} ({detail})") from None
    if not names:
        raise InvalidSafetensors("it holds no tensors")
    return metadata, names
