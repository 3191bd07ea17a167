"""Reading a dataset folder: images, captions, concepts, repeats and held-out images.

Layout (kohya-compatible):

    dataset/
      img001.png  img001.txt        root images: the config's trigger_word
      10_xyz_cat/ ...               a concept repeated 10 times per epoch, trigger 'xyz_cat'
      xyz_dog/ ...                  a concept, trigger 'xyz_dog' (or trigger_words['xyz_dog'])
      validation/ ...               held out, never trained on

Every image is opened and decoded here, before step 1, so a corrupt file stops the run at
once with its name instead of killing it hours in.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
VALIDATION_FOLDER = "validation"
ORIENTATION_TAG = 0x0112  # EXIF
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


@dataclass
class DatasetIndex:
    root: Path
    images: list[ImageRecord]
    validation: list[ImageRecord]
    concepts: list[Concept]
    warnings: list[str] = field(default_factory=list)

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
    concept_folders = [p for p in folders if p.name != VALIDATION_FOLDER and image_files(p, recursive=True)]
    has_root_images = any(image_files(root, recursive=False))
    single_concept = len(concept_folders) + int(has_root_images) == 1

    images: list[ImageRecord] = []
    concepts: list[Concept] = []
    warnings: list[str] = []
    broken: list[str] = []

    def add_concept(folder: Path, name: str, trigger: str | None, repeats: int, recursive: bool) -> None:
        folder_name = "" if folder == root else folder.name
        records = _read_records(
            folder, name, folder_name, trigger, repeats, instance_prompt, recursive, warnings, broken, root
        )
        images.extend(records)
        concepts.append(Concept(name, folder_name, trigger, repeats, len(records)))

    if has_root_images:
        add_concept(root, "", trigger_word, 1, recursive=False)
    for folder in concept_folders:
        match = _REPEAT_FOLDER.match(folder.name)
        repeats, name = (int(match.group(1)), match.group(2)) if match else (1, folder.name)
        if repeats < 1:
            raise DatasetError(f"folder {folder.name}: a repeat count must be at least 1")
        trigger = trigger_words.get(folder.name) or trigger_words.get(name)
        if trigger is None:
            trigger = trigger_word if single_concept and trigger_word else name
        add_concept(folder, name, trigger, repeats, recursive=True)

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
    if not images:
        raise DatasetError(
            f"no training images in {root}: put .jpg/.jpeg/.png/.webp files (each with a same-named .txt "
            "caption) in the folder or in concept subfolders"
        )
    unknown = set(trigger_words) - {c.folder for c in concepts} - {c.name for c in concepts}
    if unknown:
        warnings.append(f"trigger_words names folders that do not exist: {', '.join(sorted(unknown))}")
    return DatasetIndex(root, images, validation, concepts, warnings)


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
    """Prior-preservation images as training records, weighted by prior_loss_weight."""
    broken: list[str] = []
    records = []
    for path in paths:
        size = _decoded_size(path, broken, path.parent)
        if size is not None:
            records.append(ImageRecord(path, caption, "class", "class", repeats, size, loss_weight))
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
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file.is_file() else ""
        caption = " ".join(caption.split())  # captions are one line; newlines become spaces
        if not caption:
            uncaptioned.append(str(path.relative_to(root)))
            caption = instance_prompt or trigger or ""
        records.append(ImageRecord(path, with_trigger_first(caption, trigger), concept, folder_name, repeats, size))
    if uncaptioned:
        fallback = "instance_prompt" if instance_prompt else "the trigger word alone"
        warnings.append(
            f"{len(uncaptioned)} image(s) have no caption and train on {fallback}: {', '.join(uncaptioned[:10])}"
        )
    return records


def _decoded_size(path: Path, broken: list[str], root: Path) -> tuple[int, int] | None:
    from PIL import Image, UnidentifiedImageError  # here, not at import: the MCP server imports this module

    try:
        with Image.open(path) as image:
            image.load()  # decode fully: verify() misses truncated files
            width, height = image.size
            # The size as displayed, which load_pixels crops (it applies the EXIF orientation): orientations
            # 5-8 turn the image by 90 degrees, e.g. a phone photo stored landscape and shown portrait.
            turned = image.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8)
            return (height, width) if turned else (width, height)
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
    if not trigger:
        return caption
    if re.search(rf"(?<![\w]){re.escape(trigger)}(?![\w])", caption, flags=re.IGNORECASE):
        return caption
    return f"{trigger} {caption}".strip() if caption else trigger
