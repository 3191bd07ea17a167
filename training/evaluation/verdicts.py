"""The verdicts of an evaluation: the best strength, and a plain sentence with the numbers for each thing
measured. The thresholds cannot be calibrated on the tiny random test models: they come from what the scores
mean for the default models (CLIP ViT-L/14, DINOv2-small), as training/diagnostics/evaluation_scores.py says."""

from __future__ import annotations

from training.diagnostics.evaluation_scores import (
    BLEED_CONTROL_SHIFT,
    BLEED_TRIGGERLESS_SHARE,
    COLLAPSE_DIVERSITY,
    NO_EFFECT_LIKENESS_GAIN,
    PROMPT_SCORE_LOSS,
    copies,
)
from training.evaluation.report import StrengthScores

# The lines a LoRA is judged by are the diagnostics' (no effect, copying, prompt lost, bleeding, collapse),
# so that these sentences and diagnose-training never disagree; their reasons are given there.
# The best strength is the lowest that reaches this share of the largest likeness gain: past it more strength
# buys little likeness and costs flexibility (prompts, stacking), as the guide's 0.7-0.8 advice says.
GAIN_SHARE = 0.9


def judge(rows: list[StrengthScores]) -> tuple[float | None, list[str]]:
    """The best strength (None when none does better than the base) and the verdicts, rows[0] being the base."""
    base, lora_rows = rows[0], rows[1:]
    if not lora_rows:
        return None, ["only strength 0 (the base model) was evaluated: nothing to compare"]
    strongest = lora_rows[-1]
    best = _best_strength(base, lora_rows)
    verdicts = [_likeness_verdict(base, lora_rows, best), _prompt_verdict(base, lora_rows)]
    if strongest.likeness_without_trigger_dino_mean is not None and strongest.likeness_dino_mean is not None:
        verdicts.append(_trigger_verdict(base, strongest))
    if strongest.control_shift is not None:
        bleeding = ": style bleeding" if strongest.control_shift > BLEED_CONTROL_SHIFT else ": no bleeding"
        verdicts.append(
            f"control prompt moved {strongest.control_shift:.2f} at strength {strongest.strength:g} "
            f"(0: unchanged; 1 - DINOv2 similarity to the base's render){bleeding}"
        )
    collapse = ": the seeds give near copies (collapse)" if strongest.diversity >= COLLAPSE_DIVERSITY else ""
    verdicts.append(
        f"diversity: similarity among seeds {strongest.diversity:.2f} at strength {strongest.strength:g} vs base "
        f"{base.diversity:.2f} (near 1: collapse){collapse}"
    )
    copied = [row for row in lora_rows if copies(row)]  # the rule's test: a near-duplicate and collapsed seeds
    if copied:
        row = copied[0]
        verdicts.append(
            f"from strength {row.strength:g} a render nearly copies training image {row.nearest_training_image} "
            f"(DINOv2 {row.likeness_dino_max:.2f}) and the seeds' renders are alike (diversity {row.diversity:.2f})"
        )
    return best, verdicts


def _keeps_prompt(base: StrengthScores, row: StrengthScores) -> bool:
    """A share of a base score of 0 or less means nothing (CLIP does not see the prompts in the base's images
    at all): then no strength is judged to lose the prompt."""
    return base.prompt_score <= 0 or row.prompt_score > (1 - PROMPT_SCORE_LOSS) * base.prompt_score


def _best_strength(base: StrengthScores, rows: list[StrengthScores]) -> float | None:
    if base.likeness_dino_mean is None:
        return None
    gains = {row.strength: row.likeness_dino_mean - base.likeness_dino_mean for row in rows if _keeps_prompt(base, row)}
    top = max(gains.values(), default=0.0)
    if top < NO_EFFECT_LIKENESS_GAIN:
        return None
    return min(strength for strength, gain in gains.items() if gain >= GAIN_SHARE * top)


def _likeness_verdict(base: StrengthScores, rows: list[StrengthScores], best: float | None) -> str:
    if base.likeness_dino_mean is None:
        return "likeness not measured (no training images): the best strength is not judged"
    if best is not None:
        row = next(row for row in rows if row.strength == best)
        return (
            f"best strength about {best:g}: likeness {row.likeness_dino_mean:.2f} vs base "
            f"{base.likeness_dino_mean:.2f} (DINOv2), prompt score {row.prompt_score:.2f} vs base "
            f"{base.prompt_score:.2f}"
        )
    strongest = max(rows, key=lambda row: row.likeness_dino_mean)
    if strongest.likeness_dino_mean - base.likeness_dino_mean < NO_EFFECT_LIKENESS_GAIN:
        return (
            f"no effect: likeness at most {strongest.likeness_dino_mean:.2f} (strength {strongest.strength:g}) vs "
            f"base {base.likeness_dino_mean:.2f} (DINOv2)"
        )
    return (
        f"likeness rises only where prompt following is lost: {strongest.likeness_dino_mean:.2f} at strength "
        f"{strongest.strength:g} vs base {base.likeness_dino_mean:.2f}, prompt score {strongest.prompt_score:.2f} vs "
        f"base {base.prompt_score:.2f}"
    )


def _prompt_verdict(base: StrengthScores, rows: list[StrengthScores]) -> str:
    if base.prompt_score <= 0:
        score = f"{base.prompt_score:.2f}"
        return f"prompt following not judged: CLIP scores the base model's images {score} for the prompts"
    floor = (1 - PROMPT_SCORE_LOSS) * base.prompt_score
    lost = next((row for row in rows if not _keeps_prompt(base, row)), None)
    if lost is not None:
        return (
            f"prompt score drops below {floor:.2f} ({1 - PROMPT_SCORE_LOSS:.0%} of the base's {base.prompt_score:.2f}) "
            f"from strength {lost.strength:g}: {lost.prompt_score:.2f}"
        )
    scores = [row.prompt_score for row in rows]
    return (
        f"prompt following holds at every strength: prompt score {min(scores):.2f}-{max(scores):.2f} vs base "
        f"{base.prompt_score:.2f} (CLIP)"
    )


def _trigger_verdict(base: StrengthScores, row: StrengthScores) -> str:
    with_trigger, without = row.likeness_dino_mean, row.likeness_without_trigger_dino_mean
    text = (
        f"trigger word: likeness at strength {row.strength:g} {with_trigger:.2f} with it, {without:.2f} without "
        f"(base {base.likeness_dino_mean:.2f})"
    )
    gain, gain_without = with_trigger - base.likeness_dino_mean, without - base.likeness_dino_mean
    if gain >= NO_EFFECT_LIKENESS_GAIN and gain_without >= BLEED_TRIGGERLESS_SHARE * gain:
        return text + ": it hardly matters, the LoRA's look comes with every prompt"
    return text
