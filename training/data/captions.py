"""Captions as trained: ai-toolkit's `[trigger]` placeholder, and the per-step augmentation, dropout and tag
shuffling (kohya semantics)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the server reads captions too, and imports no numpy for it
    import numpy as np

    from training.config import TrainingConfig

TRIGGER_PLACEHOLDER = "[trigger]"


def fill_trigger(text: str, trigger: str | None) -> str:
    """`text` (a caption or a sample prompt) with ai-toolkit's `[trigger]` replaced by the trigger word; with
    no trigger word it goes, with the comma or space that set it off."""
    if TRIGGER_PLACEHOLDER not in text:
        return text
    tags = text.replace(TRIGGER_PLACEHOLDER, trigger or "").split(",")
    return ", ".join(" ".join(tag.split()) for tag in tags if tag.strip())


def rendered_prompts(config: TrainingConfig) -> list[str]:
    """The test prompts as rendered: `[trigger]` (ai-toolkit's placeholder) replaced by the trigger word."""
    return [fill_trigger(prompt, config.trigger_word) for prompt in config.test_prompts]


def control_prompt(config: TrainingConfig) -> str | None:
    """The configured control prompt, else the first test prompt with its trigger words taken out
    (None when nothing is left, or there are no test prompts)."""
    if config.control_prompt:
        return config.control_prompt
    if not config.test_prompts:
        return None
    return without_trigger(rendered_prompts(config)[0], [config.trigger_word, *config.trigger_words.values()])


def without_trigger(prompt: str, words: list[str | None]) -> str | None:
    """`prompt` with the trigger `words` taken out, and the commas and spaces they leave at its ends; None when
    nothing is left or no word was in it (the prompt would be the same)."""
    stripped = prompt
    for word in words:
        if word:
            stripped = re.sub(rf"(?<![\w-]){re.escape(word)}(?![\w-])", " ", stripped)
    stripped = re.sub(r"\s+", " ", re.sub(r"^[\s,]+|[\s,]+$", "", stripped)).strip()
    return stripped if stripped and stripped != prompt else None


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
