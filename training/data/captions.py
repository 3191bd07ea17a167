"""Per-step caption augmentation: dropout and tag shuffling (kohya semantics)."""

from __future__ import annotations

import numpy as np


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
