"""Captions as trained: ai-toolkit's `[trigger]` placeholder, and the per-step augmentation, dropout and tag
shuffling (kohya semantics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the server reads captions too, and imports no numpy for it
    import numpy as np

TRIGGER_PLACEHOLDER = "[trigger]"


def fill_trigger(text: str, trigger: str | None) -> str:
    """`text` (a caption or a sample prompt) with ai-toolkit's `[trigger]` replaced by the trigger word; with
    no trigger word it goes, with the comma or space that set it off."""
    if TRIGGER_PLACEHOLDER not in text:
        return text
    tags = text.replace(TRIGGER_PLACEHOLDER, trigger or "").split(",")
    return ", ".join(" ".join(tag.split()) for tag in tags if tag.strip())


def augment_caption(
    caption: str, *, dropout_rate: float, shuffle: bool, keep_tokens: int, rng: np.random.Generator
) -> str:
    """Return the caption to train this sample on.

    With probability `dropout_rate` the caption is empty (the model also learns the image
    unconditioned, which keeps the LoRA usable at CFG). Shuffling permutes the
    comma-separated tags after the first `keep_tokens`, which stay in front: with the default
    of 1 the trigger word's tag never moves.
    """
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",")]
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    return ", ".join(t for t in fixed + rest if t)
