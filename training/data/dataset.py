"""Reading a dataset folder: images, captions, concepts, repeats and held-out images.

Layout (kohya-compatible):

    dataset/
      img001.png  img001.txt        root images: the config's trigger_word
      10_xyz_cat/ ...               a concept repeated 10 times per epoch, trigger 'xyz_cat'
      xyz_dog/ ...                  a concept, trigger 'xyz_dog' (or trigger_words['xyz_dog'])
      concept1/ ...                 captions that all start with their own trigger ('ohwx'): nothing added
      validation/ ...               held out, never trained on
      class/ ...                    prior-preservation (class) images, used with prior_preservation

A concept folder's trigger, put first in each of its captions that lacks it, is decided by
`concept_trigger`: trigger_words[folder] when listed; the config's trigger_word for the dataset's
only concept or when every caption holds it; the first word every caption starts with, when it starts
no other concept's captions, is no stop word ('a', 'photo', ...) and either has a trigger's shape
('xyz_cat', 'sks1') or the folder's name is neutral ('concept1', 'images', '2_set_3': any word then,
'ohwx', 'sks') (captions carrying their own trigger, trained as they are, as kohya does: kohya puts a
folder's name only into images without a caption); else the folder's name without its 'N_' prefix.

Every image is opened and decoded here, before step 1, so a corrupt file stops the run at
once with its name instead of killing it hours in.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from training.data.captions import fill_trigger

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
VALIDATION_FOLDER = "validation"
CLASS_FOLDER = "class"
_FIRST_WORD = re.compile(r"[\w.-]+")  # a caption's first word; "[trigger]", a placeholder, is none
_TRIGGER_SHAPE = re.compile(r"[_\d]")  # 'xyz_style', 'sks1': plain words such as 'a' or 'photo' are no triggers
_COUNT_TAG = re.compile(r"^\d+(girl|boy|other)s?$")  # booru tags ('1girl', '2boys') open captions, as no trigger
# Words captions open with that name no subject: never a caption's own trigger, whatever the folder.
_STOP_WORDS = frozenset(
    "a an the this one my photo photograph picture image portrait close-up closeup painting drawing illustration "
    "sketch render rendering screenshot masterpiece best highres solo".split()
)
# Folder names that say nothing of their images (after the 'N_' prefix: nothing, digits, or one of these words with
# digits, as in the guide's concept1/, or images/, img2/, set_3/): such a name is a folder's trigger only when its
# captions carry none of their own, which then may have any shape ('sks', 'ohwx').
_NEUTRAL_FOLDER = re.compile(
    r"^(\d+_)?((concepts?|images?|imgs?|pics?|pictures?|photos?|sets?|data|dataset|class|folder|dir|subject|"
    r"instance|train|training|samples?|group|part|batch)[ _-]?)?\d*$",
    re.IGNORECASE,
)
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


class DatasetError(ValueError):
    """The dataset cannot be trained on; the message names the files and what to do."""


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str  # with the concept's trigger word first
    concept: str  # "" for images at the dataset root
    folder: str  # the concept's folder name ("" for the root), e.g. "10_xyz_cat"
    repeats: int
    size: tuple[int, int]  # (width, height) in pixels
    loss_weight: float = 1.0  # prior_loss_weight for class images, 1 for the dataset's own


@dataclass(frozen=True)
class Concept:
    name: str
    folder: str
    trigger_word: str | None
    repeats: int
    num_images: int
    trigger_reason: str = ""  # why this trigger (concept_trigger's words)


@dataclass
class DatasetIndex:
    root: Path
    images: list[ImageRecord]
    validation: list[ImageRecord]
    concepts: list[Concept]
    warnings: list[str] = field(default_factory=list)
    class_images: list[Path] = field(default_factory=list)  # the dataset's class/ folder: prior preservation's

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_samples(self) -> int:
        """Images per epoch, repeats counted."""
        return sum(r.repeats for r in self.images)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ss_tag_frequency: per concept folder, how often each comma-separated tag occurs."""
        freq: dict[str, Counter] = {}
        for record in self.images:
            tags = (t.strip() for t in record.caption.split(","))
            freq.setdefault(record.folder or ".", Counter()).update(t for t in tags if t)
        return {folder: dict(counter) for folder, counter in freq.items()}


def scan_dataset(
    root: str | Path,
    *,
    trigger_word: str | None,
    trigger_words: dict[str, str],
    instance_prompt: str | None = None,
) -> DatasetIndex:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    root = root.resolve()

    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    # A subfolder is a concept only if it holds images (a notes/ folder is not one).
    concept_folders = [
        p for p in folders if p.name not in (VALIDATION_FOLDER, CLASS_FOLDER) and image_files(p, recursive=True)
    ]
    has_root_images = any(image_files(root, recursive=False))
    single_concept = len(concept_folders) + int(has_root_images) == 1

    images: list[ImageRecord] = []
    concepts: list[Concept] = []
    warnings: list[str] = []
    broken: list[str] = []

    def add_concept(folder: Path, name: str, trigger: str | None, repeats: int, recursive: bool, why: str) -> None:
        folder_name = "" if folder == root else folder.name
        records = _read_records(
            folder, name, folder_name, trigger, repeats, instance_prompt, recursive, warnings, broken, root
        )
        images.extend(records)
        concepts.append(Concept(name, folder_name, trigger, repeats, len(records), why))

    if has_root_images:
        add_concept(root, "", trigger_word, 1, recursive=False, why="the config's trigger_word (root images)")
    for folder, name, repeats, trigger, why in _concept_triggers(
        concept_folders, trigger_word=trigger_word, trigger_words=trigger_words, only=single_concept
    ):
        add_concept(folder, name, trigger, repeats, recursive=True, why=why)
    implicit = [c for c in concepts if c.folder and not c.trigger_reason.startswith(("trigger_words", "the config"))]
    if implicit:
        warnings.append(
            "concept triggers (set trigger_words {folder: word} to choose another): "
            + "; ".join(f"{c.folder} -> {c.trigger_word!r}, {c.trigger_reason}" for c in implicit)
        )

    validation: list[ImageRecord] = []
    if (root / VALIDATION_FOLDER).is_dir():
        validation = _read_records(
            root / VALIDATION_FOLDER,
            VALIDATION_FOLDER,
            VALIDATION_FOLDER,
            trigger_word,
            1,
            instance_prompt,
            True,
            warnings,
            broken,
            root,
        )

    if broken:
        raise DatasetError(
            f"{len(broken)} image(s) cannot be read; fix or remove them and start again: " + "; ".join(broken)
        )
    class_images = image_files(root / CLASS_FOLDER, recursive=True) if (root / CLASS_FOLDER).is_dir() else []
    if not images:
        raise DatasetError(
            f"no training images in {root}: put .jpg/.jpeg/.png/.webp files (each with a same-named .txt "
            "caption) in the folder or in concept subfolders"
        )
    unknown = set(trigger_words) - {c.folder for c in concepts} - {c.name for c in concepts}
    if unknown:
        warnings.append(f"trigger_words names folders that do not exist: {', '.join(sorted(unknown))}")
    return DatasetIndex(root, images, validation, concepts, warnings, class_images)


def _concept_triggers(
    folders: list[Path], *, trigger_word: str | None, trigger_words: dict[str, str], only: bool
) -> list[tuple[Path, str, int, str | None, str]]:
    """Each concept folder with its name (without the 'N_' prefix), repeats, trigger and why (concept_trigger's)."""
    captions = {f: [c for c in map(read_caption, image_files(f, recursive=True)) if c] for f in folders}
    firsts = {f: _common_first_word(captions[f]) for f in folders}
    # A first word that starts the captions of several concepts tells none of them apart: it is no concept's own.
    seen = Counter(first.lower() for first in firsts.values() if first)
    found = []
    for folder in folders:
        match = _REPEAT_FOLDER.match(folder.name)
        repeats, name = (int(match.group(1)), match.group(2)) if match else (1, folder.name)
        if repeats < 1:
            raise DatasetError(f"folder {folder.name}: a repeat count must be at least 1")
        first = firsts[folder]
        own = first if first and seen[first.lower()] == 1 and _may_be_own_trigger(first, folder.name) else None
        options = {"trigger_word": trigger_word, "trigger_words": trigger_words, "only": only}
        found.append((folder, name, repeats, *concept_trigger(folder.name, name, captions[folder], own, **options)))
    return found


def _may_be_own_trigger(word: str, folder: str) -> bool:
    """Whether `word`, which starts every caption of `folder`, may be the captions' own trigger: never a stop word
    or a booru count tag; any other word in a neutrally named folder; else only a word of a trigger's shape (an
    '_' or a digit, 'xyz_cat', 'sks1'), so that '10_xyz_cat/' captioned 'cat sitting' keeps the trigger xyz_cat."""
    lower = word.lower()
    if lower in _STOP_WORDS or _COUNT_TAG.match(lower):
        return False
    return bool(_NEUTRAL_FOLDER.match(folder) or _TRIGGER_SHAPE.search(word))


def concept_trigger(
    folder: str,
    name: str,
    captions: list[str],
    own: str | None,
    *,
    trigger_word: str | None,
    trigger_words: dict[str, str],
    only: bool,
) -> tuple[str | None, str]:
    """The trigger of the concept folder `folder` (`name`: without its 'N_' prefix) whose non-empty captions
    are `captions`, and why; `own`: the first word they all start with, where it is this concept's alone;
    `only`: it is the dataset's only concept."""
    for key in (folder, name):
        if trigger_words.get(key):
            return trigger_words[key], f"trigger_words[{key!r}]"
    if trigger_word and only:
        return trigger_word, "the config's trigger_word (the dataset's only concept)"
    if trigger_word and captions and all(_holds_word(c, trigger_word) for c in captions):
        return trigger_word, "the config's trigger_word, which every caption holds"
    if own:
        return own, "every caption starts with it: the captions' own trigger, nothing added"
    return name, "the folder's name: its captions start with no trigger of their own, so it is put first"


def _common_first_word(captions: list[str]) -> str | None:
    """The first word every caption starts with, any shape; None when they differ or have none."""
    firsts = {match.group() if (match := _FIRST_WORD.match(caption)) else "" for caption in captions}
    return (firsts.pop() or None) if len(firsts) == 1 else None


def shared_first_word(captions: list[str]) -> str | None:
    """The first word of every caption when they all share it and it has a trigger's shape (an '_' or a digit,
    as in 'xyz_style' or 'sks1': plain words such as 'a' are not triggers, nor booru tags such as '1girl')."""
    word = _common_first_word(captions)
    return word if word and _TRIGGER_SHAPE.search(word) and not _COUNT_TAG.match(word.lower()) else None


def locate_dataset(dataset_path: str, datasets_root: Path) -> Path:
    """A folder path as given (absolute, or relative to the working directory), else a dataset
    name under the workspace's datasets/ folder."""
    if not dataset_path.strip():
        raise DatasetError("dataset_path is empty: give a dataset name or a folder path")
    given = Path(dataset_path).expanduser()
    if given.is_dir():
        return given.resolve()
    by_name = datasets_root / dataset_path
    if "/" not in dataset_path and ".." not in dataset_path and by_name.is_dir():
        return by_name.resolve()
    raise DatasetError(
        f"dataset {dataset_path!r} not found: it is neither a folder ({given.resolve()}) nor a dataset "
        f"in {datasets_root}; check dataset_path"
    )


def class_image_records(paths: list[Path], caption: str, *, repeats: int, loss_weight: float) -> list[ImageRecord]:
    """Prior-preservation images as training records, weighted by prior_loss_weight: each with its own .txt
    caption, as kohya's regularization images, else `caption` (class_prompt; the generated ones have none)."""
    broken: list[str] = []
    records = []
    for path in paths:
        size = _decoded_size(path, broken, path.parent)
        if size is not None:
            own = read_caption(path) or caption
            records.append(ImageRecord(path, own, "class", "class", repeats, size, loss_weight))
    if broken:
        raise DatasetError(f"class image(s) cannot be read; remove them: {'; '.join(broken)}")
    return records


def image_files(folder: Path, recursive: bool) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in candidates
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _read_records(
    folder: Path,
    concept: str,
    folder_name: str,
    trigger: str | None,
    repeats: int,
    instance_prompt: str | None,
    recursive: bool,
    warnings: list[str],
    broken: list[str],
    root: Path,
) -> list[ImageRecord]:
    records = []
    uncaptioned = []
    for path in image_files(folder, recursive):
        size = _decoded_size(path, broken, root)
        if size is None:
            continue
        caption = read_caption(path)
        if not caption:
            uncaptioned.append(str(path.relative_to(root)))
            caption = instance_prompt or trigger or ""
        caption = with_trigger_first(fill_trigger(caption, trigger), trigger)
        records.append(ImageRecord(path, caption, concept, folder_name, repeats, size))
    if uncaptioned:
        fallback = "instance_prompt" if instance_prompt else "the trigger word alone"
        warnings.append(
            f"{len(uncaptioned)} image(s) have no caption and train on {fallback}: {', '.join(uncaptioned[:10])}"
        )
    return records


def read_caption(image: Path) -> str:
    """The image's caption as one line (newlines become spaces); '' when it has none."""
    caption_file = image.with_suffix(".txt")
    caption = caption_file.read_text(encoding="utf-8", errors="replace") if caption_file.is_file() else ""
    return " ".join(caption.split())


def _decoded_size(path: Path, broken: list[str], root: Path) -> tuple[int, int] | None:
    from PIL import Image, UnidentifiedImageError  # here, not at import: the MCP server imports this module

    from training.image_files import upright_size

    try:
        with Image.open(path) as image:
            image.load()  # decode fully: verify() misses truncated files
            return upright_size(image)  # as displayed, which load_pixels crops (it applies the orientation)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        broken.append(f"{path.relative_to(root)} ({type(exc).__name__}: {exc})")
        return None


def hold_out(index: DatasetIndex, share: float, seed: int) -> DatasetIndex:
    """The dataset with `share` of its images moved to validation (at least one, and at least one
    left to train on), unless it has a validation folder already or share is 0."""
    if index.validation or share <= 0 or index.num_images < 2:
        return index
    count = min(index.num_images - 1, max(1, round(share * index.num_images)))
    chosen = set(random.Random(seed).sample(range(index.num_images), count))
    return replace(
        index,
        images=[r for i, r in enumerate(index.images) if i not in chosen],
        validation=[r for i, r in enumerate(index.images) if i in chosen],
    )


def with_trigger_first(caption: str, trigger: str | None) -> str:
    """Put the trigger word first when the caption lacks it (as a whole word, any case)."""
    if not trigger or _holds_word(caption, trigger):
        return caption
    return f"{trigger} {caption}".strip() if caption else trigger


def _holds_word(caption: str, word: str) -> bool:
    """Whether `word` is in `caption` as a whole word, any case."""
    return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", caption, flags=re.IGNORECASE) is not None
