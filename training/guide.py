"""The LoRA training guide's numbers, once: its tables and the defaults taken from them.

The guide (`lora-training-guide.md`) is the document the product is built from. The config's defaults
(`training/config.py`), the diagnostic rules (`training/diagnostics/`), the training plans
(`training/plans.py`), the dataset report and caption lint (`training/data/`) and the server's tool
descriptions and prompts read its numbers here; what it says of one model family is that family's
(`training/families/`). This module imports nothing of the project, so every layer, the families included,
may import it without a cycle.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal, get_args

# --- kinds of LoRA ---------------------------------------------------------------------------
# The kinds the guide's dataset-size and strength tables distinguish; every tool that takes one uses this.
LoraType = Literal["style", "character", "person", "object", "concept", "complex_style", "pose", "details"]
# What a dataset is judged as when no kind is named: the guide's first "Common Training Scenario".
DEFAULT_LORA_TYPE: LoraType = "style"
# Prior preservation needs a class to preserve (a config without class_prompt takes it from here). Kinds that
# teach one subject have one; styles, poses, details and abstract concepts have none.
CLASS_PROMPTS: dict[str, str] = {
    "person": "a photo of a person",
    "character": "an illustration of a character",
    "object": "a photo of an object",
}


# Class words a dataset's captions may name, most specific first: with no class_prompt, lora_type or
# instance prompt to go by, prior preservation keeps the one that at least half of the captions name
# (the guide's Advanced config sets prior_preservation with none of them).
CAPTION_CLASSES = ("woman", "man", "girl", "boy", "child", "person", "dog", "cat", "car", "character")
# Their plurals that are not the word plus 's' (captions of groups say "two women", "children playing").
IRREGULAR_PLURALS = {"woman": "women", "man": "men", "child": "children", "person": "people"}


def derived_class_prompt(config, captions: Sequence[str] = ()) -> tuple[str, str] | None:
    """The class prompt prior preservation uses when a TrainingConfig sets no class_prompt, and a line saying
    where it comes from, or None: the LoRA type's class, else the instance prompt without its trigger word
    (DreamBooth's 'xyz_person person'), else the class word most of the dataset's `captions` name."""
    if config.lora_type in CLASS_PROMPTS:
        prompt = CLASS_PROMPTS[config.lora_type]
        return prompt, f"using {prompt!r} from lora_type {config.lora_type}"
    words = (config.instance_prompt or "").split()
    if config.trigger_word in words and (rest := " ".join(w for w in words if w != config.trigger_word).strip(" ,")):
        return rest, f"using {rest!r} from instance_prompt {config.instance_prompt!r} without the trigger word"
    if config.lora_type is None and (named := _class_named_by(captions)):
        word, count = named
        prompt = f"a photo of a {word}"
        return prompt, f"using {prompt!r}: {count} of {len(captions)} captions name a {word}"
    return None


def _class_named_by(captions: Sequence[str]) -> tuple[str, int] | None:
    """The class word (singular or plural, any case) named by the most captions, if by at least half."""
    forms = {word: re.compile(rf"\b({word}s?|{IRREGULAR_PLURALS.get(word, word)})\b", re.I) for word in CAPTION_CLASSES}
    counts = {word: sum(1 for c in captions if forms[word].search(c)) for word in CAPTION_CLASSES}
    word = max(CAPTION_CLASSES, key=lambda w: counts[w])  # max keeps the first of a tie: the more specific
    return (word, counts[word]) if captions and 2 * counts[word] >= len(captions) else None


# --- steps -----------------------------------------------------------------------------------
STEPS_PER_IMAGE = 100  # the guide: "Optimal Steps = 100 x number_of_images"

# --- learning rate ---------------------------------------------------------------------------
# The guide's "Learning Rate" list: (value, the guide's words). Adaptive optimizers differ: Prodigy
# estimates its own step and wants lr 1.0.
LEARNING_RATES: dict[str, tuple[float, str]] = {
    "default": (2e-4, "Good for most cases"),
    "conservative": (1e-4, "Slower but safer"),
    "aggressive": (3e-4, "For stubborn concepts"),
    "fine_tuning": (5e-5, "For existing styles"),
}
DEFAULT_LEARNING_RATE = LEARNING_RATES["default"][0]
CONSERVATIVE_LEARNING_RATE = LEARNING_RATES["conservative"][0]
GUIDE_LR_RANGE = (LEARNING_RATES["fine_tuning"][0], LEARNING_RATES["aggressive"][0])
PRODIGY_LR = 1.0


def lr_text(value: float) -> str:
    """A learning rate as the guide writes it: 2e-4, 5e-5."""
    return f"{value:.0e}".replace("e-0", "e-")


def span(bounds: tuple[float, float]) -> str:
    """A (low, high) row as the guide writes it: 10-50, 0.6-1.0, 0.05-0.15."""
    return f"{bounds[0]}-{bounds[1]}"


# --- rank and file size ----------------------------------------------------------------------
# The guide's "Rank Selection" table: (lowest rank, highest rank, use case, approximate file size in MB).
RANK_TABLE: tuple[tuple[int, int, str, int], ...] = (
    (4, 8, "Simple style adjustments", 10),
    (16, 32, "Standard character/style LoRAs", 50),
    (64, 96, "Complex concepts, multiple subjects", 150),
    (128, 128, "Maximum detail/flexibility", 300),
)
# The top of the "Standard character/style LoRAs" band, and the config's rank default (the guide's examples
# train at 'rank': 32, 'alpha': 32).
STANDARD_RANK = 32
# Rank against dataset size. The guide's 16-32 is for datasets of 10-100 images, 64-96 for complex concepts
# and multiple subjects, 128 for maximum detail (complex styles: 50-200 images). A rank of 64+ on under 30
# images (128 on under 50) has 2-4x the parameters of a rank-32 LoRA with nothing more to learn from: it
# memorises the images, and the file grows from ~50 MB to ~150-300 MB. Checked in order: (smallest rank,
# fewest images it needs).
RANK_NEEDS_IMAGES = ((128, 50), (64, 30))


def rank_row(rank: int) -> tuple[int, int, str, int]:
    """The row of the guide's rank table that gives `rank`'s file size: its band, or the next band's
    between bands (the last band's above it)."""
    return next((row for row in RANK_TABLE if rank <= row[1]), RANK_TABLE[-1])


def guide_file_mb(rank: int) -> int:
    """The LoRA file size (MB) the guide's rank table gives for `rank`."""
    return rank_row(rank)[3]


# Rank per kind of LoRA, from the Rank Selection table and the guide's "Common Training Scenarios".
RANK_BY_TYPE: dict[str, tuple[int, str]] = {
    "style": (
        16,
        "the guide's Style LoRA example ('watercolor-style', rank 16), in the 16-32 band 'Standard "
        "character/style LoRAs'",
    ),
    "character": (
        32,
        "the guide's Character LoRA example ('game-character', rank 32), in the 16-32 band 'Standard "
        "character/style LoRAs'",
    ),
    "person": (
        24,
        "the guide's Photographic Subject example ('Training a person or object', rank 24), in the 16-32 band",
    ),
    "object": (
        24,
        "the guide's Photographic Subject example ('Training a person or object', rank 24), in the 16-32 band",
    ),
    "concept": (
        32,
        "the top of the guide's 16-32 'Standard' band: a concept shown across varied subjects needs more "
        "room than one object (24), but one concept is not the 64-96 band's 'Complex concepts, multiple subjects' "
        "(use 64 if yours has several subjects)",
    ),
    "complex_style": (
        64,
        "the guide's 64-96 band 'Complex concepts, multiple subjects': a complex style has many "
        "elements to learn (its dataset range is 50-200 images), 64 is the band's floor",
    ),
    "pose": (
        8,
        "the top of the guide's 4-8 band 'Simple style adjustments': a pose is a narrow change, used at the "
        "low strengths of the guide's Pose row (0.4-0.7), and a small rank keeps it from learning the subjects' looks",
    ),
    "details": (
        8,
        "the top of the guide's 4-8 band 'Simple style adjustments': added detail is a narrow change, used "
        "at the guide's Details strengths (0.3-0.6)",
    ),
}

# --- dataset size ----------------------------------------------------------------------------
# The guide's "Dataset Size Guidelines". It gives none for pose and details LoRAs; they are taught
# like objects and concepts, so they share that range.
GUIDE_IMAGE_RANGE: dict[str, tuple[int, int]] = {
    "style": (10, 50),
    "character": (20, 100),
    "person": (20, 100),
    "object": (15, 50),
    "concept": (15, 50),
    "complex_style": (50, 200),
    "pose": (15, 50),
    "details": (15, 50),
}
assert set(GUIDE_IMAGE_RANGE) == set(get_args(LoraType))

# --- using a LoRA ----------------------------------------------------------------------------
# The guide's "Optimal Strength Settings": row -> (model strength, CLIP strength), each (low, high).
GUIDE_STRENGTHS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "style": ((0.6, 1.0), (0.6, 1.0)),
    "character": ((0.7, 0.9), (0.7, 0.9)),
    "pose": ((0.4, 0.7), (0.3, 0.6)),
    "details": ((0.3, 0.6), (0.3, 0.6)),
}
# The row of the guide's "Optimal Strength Settings" (GUIDE_STRENGTHS) each kind uses: kinds without a row of
# their own use the nearest row, and say why.
STRENGTH_ROW: dict[str, tuple[str, str]] = {
    "style": ("style", ""),
    "character": ("character", ""),
    "pose": ("pose", ""),
    "details": ("details", ""),
    "person": ("character", "a person is, like a character, one subject to reproduce faithfully"),
    "object": ("character", "an object is, like a character, one subject to reproduce faithfully"),
    "concept": (
        "character",
        "a concept, like a character, should appear when triggered while the rest of the prompt stays in control",
    ),
    "complex_style": ("style", "a complex style is a style: it may shape the whole image"),
}
assert set(RANK_BY_TYPE) == set(STRENGTH_ROW) == set(get_args(LoraType))

# --- captions --------------------------------------------------------------------------------
# CLIP reads 77 positions: 75 caption tokens between its start and end tokens. Longer captions are encoded
# in 75-token chunks (kohya's max_token_length 150 or 225); 75 is the default.
CAPTION_TOKENS = 75
# Ordinary words the model already knows; the guide: "Use unique trigger words (xyz_style, not 'style')".
GENERIC_TRIGGERS = {"style", "person", "man", "woman", "character", "object", "concept", "art", "photo", "dog", "cat"}

# --- loss ------------------------------------------------------------------------------------
GUIDE_LOSS_TARGET = (0.05, 0.15)  # the guide: "Loss: Should decrease over time (target: 0.05-0.15)"

# --- the guide's "Memory Optimization" preset, as config values --------------------------------
MEMORY_PRESET = {"low_vram": True, "gradient_checkpointing": True, "batch_size": 1, "optimizer": "adafactor"}


# --- model size ------------------------------------------------------------------------------
# The guide's per-family rows ("Required Hardware", "Training Time") are each family's, in training/families/.
# A native size under this is a tiny test model (builtin:tiny-*, 64 px), which the guide's table does not describe.
SMALLEST_REAL_NATIVE = 256
