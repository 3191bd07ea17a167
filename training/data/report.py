"""Inspecting a dataset before any training step is spent on it.

Counts, sizes and formats, caption coverage and trigger words, near-duplicates (a 64-bit
difference hash), blur (the Laplacian at the image's strongest edges), exposure (luminance
histogram), caption variety, and a verdict against the guide's dataset sizes for the kind of LoRA.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, Field

from training.data.dataset import IMAGE_SUFFIXES, scan_dataset
from training.guide import DEFAULT_LORA_TYPE, GUIDE_IMAGE_RANGE, LoraType

NEAR_DUPLICATE_BITS = 6  # of 64 hash bits: re-encodes and small crops stay within ~4, different photos differ by 20+
# Blur: |Laplacian| / |gradient| over the strongest 5% of edges. A step edge gives 1.9-2.4 (measured on
# drawn shapes and on noise, 64-512 px); a Gaussian blur of 1/64 of the width brings it to 0.5-0.7. Plain
# variance of the Laplacian would call every flat, sharp image blurry, since it counts edges, not their width.
BLUR_RATIO = 1.0
EDGELESS_GRADIENT = 4.0  # grey levels per pixel: an image whose strongest edge is weaker has none worth the name
DARK_MEAN, BRIGHT_MEAN = 40.0, 215.0  # mean luminance (0-255) outside which an image is badly exposed
CLIPPED_SHARE = 0.5  # ... or when half its pixels are crushed to black or blown to white
CAPTION_SIMILARITY = 0.9  # word-set overlap (Jaccard) above which two captions say the same thing


class ConceptCount(BaseModel):
    folder: str = Field(description="Concept folder ('' for images at the dataset root).")
    trigger_word: str | None = Field(description="The trigger training puts first in each caption that lacks it.")
    trigger_reason: str = Field(  # a default: reports written before it existed still load
        "", description="Why this trigger: trigger_words, trigger_word, the captions' own, or the folder's name."
    )
    repeats: int
    images: int
    samples_per_epoch: int = Field(description="images x repeats")


class DatasetReport(BaseModel):
    dataset: str
    images: int = Field(description="Training images (validation excluded).")
    validation_images: int
    class_images: int = Field(0, description="Images in the class/ folder: prior preservation's, not a concept.")
    samples_per_epoch: int
    concepts: list[ConceptCount]
    resolution_min: list[int] = Field(description="[width, height] of the smallest image (by area).")
    resolution_median: list[int]
    resolution_max: list[int]
    buckets: dict[str, int] = Field(description="Aspect-ratio buckets at the checked resolution: 'WxH': images.")
    formats: dict[str, int]
    total_size_bytes: int
    uncaptioned: list[str] = Field(description="Images without a .txt caption.")
    orphan_captions: list[str] = Field(description="Captions without an image.")
    missing_trigger: list[str] = Field(description="Captions that lack their concept's trigger word.")
    near_duplicates: list[list[str]] = Field(description="Groups of images that look the same.")
    below_native_resolution: list[str] = Field(description="Images smaller than the model's native size.")
    blurry: list[str]
    badly_exposed: list[str]
    similar_captions: list[list[str]] = Field(description="Groups of images whose captions are near-identical.")
    lora_type: LoraType
    verdict: str = Field(description="The image count against the guide's range for this kind of LoRA.")
    problems: list[str] = Field(description="What to fix, one line each; empty for a clean dataset.")


def inspect_dataset(
    root: Path,
    *,
    lora_type: LoraType = DEFAULT_LORA_TYPE,
    trigger_word: str | None = None,
    trigger_words: dict[str, str] | None = None,
    native_resolution: int = 512,
    bucket_step: int = 64,
) -> DatasetReport:
    """The report for the dataset folder `root`; `native_resolution` and `bucket_step` are the
    target model's (512 and 64 for SD 1.5). Raises DatasetError when it cannot be read at all."""
    # numpy and Pillow are imported by the functions that use them: the MCP server imports this
    # module for its result model at start-up, and stays light.
    from training.data.buckets import assign_bucket, make_buckets

    index = scan_dataset(root, trigger_word=trigger_word, trigger_words=trigger_words or {})
    root = index.root
    images = index.images
    names = [str(r.path.relative_to(root)) for r in images]
    sizes = sorted((r.size for r in images), key=lambda s: s[0] * s[1])
    buckets = make_buckets(native_resolution, bucket_step)
    bucket_counts = Counter(assign_bucket(r.size, buckets, bucket_step) for r in images)

    uncaptioned = [n for n, r in zip(names, images) if not r.path.with_suffix(".txt").is_file()]
    missing_trigger = [
        n for n, r in zip(names, images) if r.path.with_suffix(".txt").is_file() and _lacks_trigger(r, index)
    ]
    pixels = [_analyse(r.path) for r in images]
    duplicates = _groups(names, [p["hash"] for p in pixels], lambda a, b: bin(a ^ b).count("1") <= NEAR_DUPLICATE_BITS)
    captions = [_words(r.caption, r.path, index) for r in images]
    similar = _groups(names, captions, lambda a, b: bool(a | b) and len(a & b) / len(a | b) >= CAPTION_SIMILARITY)
    report = DatasetReport(
        dataset=str(root),
        images=len(images),
        validation_images=len(index.validation),
        class_images=len(index.class_images),
        samples_per_epoch=index.num_samples,
        concepts=[
            ConceptCount(
                folder=c.folder,
                trigger_word=c.trigger_word,
                trigger_reason=c.trigger_reason,
                repeats=c.repeats,
                images=c.num_images,
                samples_per_epoch=c.num_images * c.repeats,
            )
            for c in index.concepts
        ],
        resolution_min=list(sizes[0]),
        resolution_median=list(sizes[len(sizes) // 2]),
        resolution_max=list(sizes[-1]),
        buckets={f"{w}x{h}": n for (w, h), n in sorted(bucket_counts.items())},
        formats=dict(Counter(r.path.suffix.lower().lstrip(".") for r in images)),
        total_size_bytes=sum(r.path.stat().st_size for r in images),
        uncaptioned=uncaptioned,
        orphan_captions=_orphan_captions(root),
        missing_trigger=missing_trigger,
        near_duplicates=duplicates,
        below_native_resolution=[n for n, r in zip(names, images) if min(r.size) < native_resolution],
        blurry=[n for n, p in zip(names, pixels) if p["sharpness"] < BLUR_RATIO],
        badly_exposed=[n for n, p in zip(names, pixels) if p["badly_exposed"]],
        similar_captions=similar,
        lora_type=lora_type,
        verdict=_verdict(len(images), lora_type),
        problems=[],
    )
    report.problems = _problems(report, native_resolution)
    return report


def _analyse(path: Path) -> dict:
    """Difference hash, edge sharpness and exposure of one image, from a grey copy of at most 512 px."""
    import numpy as np
    from PIL import Image

    from training.image_files import upright_image

    with upright_image(path) as image:
        grey = image.convert("L")
        grey.thumbnail((512, 512))
        small = np.asarray(grey.resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
        values = np.asarray(grey, dtype=np.float32)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    digest = int("".join("1" if b else "0" for b in bits), 2)
    centre = values[1:-1, 1:-1]
    laplacian = values[1:-1, :-2] + values[1:-1, 2:] + values[:-2, 1:-1] + values[2:, 1:-1] - 4 * centre
    gradient = np.hypot(values[1:-1, 2:] - values[1:-1, :-2], values[2:, 1:-1] - values[:-2, 1:-1]) / 2
    if gradient.size == 0 or gradient.max() < EDGELESS_GRADIENT:
        sharpness = 0.0
    else:
        edges = gradient >= np.percentile(gradient, 95)
        sharpness = float(np.abs(laplacian[edges]).mean() / gradient[edges].mean())
    clipped = float(np.mean((values <= 8) | (values >= 247)))
    mean = float(values.mean())
    return {
        "hash": digest,
        "sharpness": sharpness,
        "badly_exposed": mean < DARK_MEAN or mean > BRIGHT_MEAN or clipped >= CLIPPED_SHARE,
    }


def _groups(names: list[str], keys: list, same) -> list[list[str]]:
    """Groups (of two or more) of names whose keys are `same`, joined transitively."""
    parent = list(range(len(names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if same(keys[i], keys[j]):
                parent[find(j)] = find(i)
    groups: dict[int, list[str]] = {}
    for i, name in enumerate(names):
        groups.setdefault(find(i), []).append(name)
    return [group for group in groups.values() if len(group) > 1]


def _words(caption: str, path: Path, index) -> frozenset[str]:
    """A caption's words without its trigger word, for comparing what captions say."""
    trigger = _trigger_of(path, index)
    words = re.findall(r"[a-z0-9_]+", caption.lower())
    return frozenset(w for w in words if not trigger or w != trigger.lower())


def _trigger_of(path: Path, index) -> str | None:
    relative = path.relative_to(index.root)
    folder = relative.parts[0] if len(relative.parts) > 1 else ""
    return next((c.trigger_word for c in index.concepts if c.folder == folder), None)


def _lacks_trigger(record, index) -> bool:
    trigger = _trigger_of(record.path, index)
    if not trigger:
        return False
    text = record.path.with_suffix(".txt").read_text(encoding="utf-8", errors="replace")
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", text, flags=re.IGNORECASE) is None


def _orphan_captions(root: Path) -> list[str]:
    orphans = []
    for caption in sorted(root.rglob("*.txt")):
        relative = caption.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if not any(
            caption.with_suffix(s).is_file() or caption.with_suffix(s.upper()).is_file() for s in IMAGE_SUFFIXES
        ):
            orphans.append(str(relative))
    return orphans


def _verdict(count: int, lora_type: str) -> str:
    low, high = GUIDE_IMAGE_RANGE[lora_type]
    if count < low:
        return f"too few: {count} images for a {lora_type} LoRA; the guide suggests {low}-{high}"
    if count > high:
        return f"more than needed: {count} images for a {lora_type} LoRA (guide: {low}-{high}); curate the best"
    return f"good: {count} images is within the guide's {low}-{high} for a {lora_type} LoRA"


def _problems(report: DatasetReport, native_resolution: int) -> list[str]:
    problems = []
    if report.verdict.startswith("too few"):
        problems.append(report.verdict)
    checks = [
        (report.uncaptioned, "image(s) have no caption: add a .txt with the trigger word first"),
        (report.orphan_captions, "caption(s) have no image: remove them or add the image"),
        (report.missing_trigger, "caption(s) lack their concept's trigger word (training puts it first)"),
        (report.blurry, "image(s) look blurry (soft or no edges): replace them with sharp ones"),
        (report.badly_exposed, "image(s) are too dark or too bright: fix or remove them"),
        (
            report.below_native_resolution,
            f"image(s) are smaller than the model's native {native_resolution}px: they train at their own size",
        ),
    ]
    for files, what in checks:
        if files:
            problems.append(f"{len(files)} {what}: {', '.join(files[:5])}{' ...' if len(files) > 5 else ''}")
    for group in report.near_duplicates:
        problems.append(f"near-duplicate images (keep one): {', '.join(group)}")
    for group in report.similar_captions:
        problems.append(f"near-identical captions (describe what differs): {', '.join(group)}")
    return problems
