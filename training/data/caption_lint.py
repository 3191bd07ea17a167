"""Checking captions against the guide's captioning rules, one finding per problem and file.

The guide: every caption starts with a unique trigger word (xyz_style, not "style"), then
`[subject] [details], [style], [quality], [composition]`; and the elements the model's family asks
for beyond those (its `caption_elements`: for FLUX-class models a camera angle, an environment and the
lighting). Captions must not be empty, repeat each other, or run past the tokens the model reads
(max_token_length).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable

from pydantic import BaseModel, Field

from training.data.dataset import DatasetIndex
from training.families import FLUX, ModelFamily
from training.guide import CAPTION_TOKENS, GENERIC_TRIGGERS

MIN_TAGS = 3  # trigger + subject, then at least two of style, quality, composition (comma-separated)
MIN_WORDS = 5


class CaptionFinding(BaseModel):
    file: str = Field(description="The image whose caption has the problem (relative to the dataset).")
    rule: str
    message: str
    suggestion: str = Field(description="How to fix it.")


def lint_captions(
    index: DatasetIndex,
    *,
    family: ModelFamily | None = None,
    flux: bool = False,
    max_tokens: int = CAPTION_TOKENS,
    count_tokens: Callable[[str], int] | None = None,
) -> list[CaptionFinding]:
    """Findings for every training image's caption file. `family` is the model's, whose caption elements
    are checked (none: no model named); `flux=True` is `family=FLUX`. `count_tokens` is the model's
    tokenizer (tokens without start/end); without it, words stand in for tokens."""
    if flux:
        family = FLUX
    findings: list[CaptionFinding] = []
    by_text: dict[str, list[str]] = defaultdict(list)
    triggers = {c.folder: c.trigger_word for c in index.concepts}
    for record in index.images:
        name = str(record.path.relative_to(index.root))
        caption_file = record.path.with_suffix(".txt")
        text = caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file.is_file() else ""
        if text:
            by_text[" ".join(text.lower().split())].append(name)
        problems = _problems(text, triggers.get(record.folder), family, max_tokens, count_tokens)
        findings += [CaptionFinding(file=name, rule=r, message=m, suggestion=f) for r, m, f in problems]
    for names in by_text.values():
        for name in names if len(names) > 1 else ():
            findings.append(
                CaptionFinding(
                    file=name,
                    rule="duplicate",
                    message=f"the caption is identical to that of {', '.join(n for n in names if n != name)}",
                    suggestion="describe what differs in this image (pose, angle, setting, light)",
                )
            )
    return findings


def _problems(
    text: str,
    trigger: str | None,
    family: ModelFamily | None,
    max_tokens: int,
    count_tokens: Callable[[str], int] | None,
) -> list[tuple[str, str, str]]:
    """(rule, message, suggestion) for each rule one caption breaks."""
    if not text:
        return [
            ("empty", "the caption is missing or empty", f"write '{trigger or 'xyz_token'} <subject>, <details>, ...'")
        ]
    problems = []
    first = re.split(r"[\s,]+", text, maxsplit=1)[0]
    if trigger and first.lower() != trigger.lower():
        problems.append(
            (
                "trigger-first",
                f"the caption does not start with the trigger word {trigger!r}",
                f"start it with '{trigger} '",
            )
        )
    if trigger and trigger.lower() in GENERIC_TRIGGERS:
        problems.append(
            (
                "generic-trigger",
                f"the trigger word {trigger!r} is an ordinary word the model already knows",
                f"use a unique token such as 'xyz_{trigger.lower()}'",
            )
        )
    if len([t for t in text.split(",") if t.strip()]) < MIN_TAGS or len(text.split()) < MIN_WORDS:
        problems.append(
            (
                "structure",
                "the caption is too thin for the guide's structure",
                "describe it as '[trigger] [subject] [details], [style], [quality], [composition]'",
            )
        )
    elements = family.caption_elements if family else {}
    missing = [element for element, pattern in elements.items() if not re.search(pattern, text.lower())]
    if missing:
        problems.append(
            (
                f"{family.id}-elements",
                f"a {family.name} caption should name the {', '.join(missing)}",
                f"add e.g. '{family.caption_example}'",
            )
        )
    tokens = count_tokens(text) if count_tokens else len(text.split())
    if tokens > max_tokens:
        problems.append(
            (
                "too-long",
                f"the caption has {tokens} tokens; the model reads {max_tokens}",
                "shorten it, or raise max_token_length to 150 or 225 in the config",
            )
        )
    return problems
