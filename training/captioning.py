"""Automatic captions: a `template` captioner that works offline, and image-to-text models
(BLIP, BLIP-2, GIT, ...) through transformers, from a local folder or the local HF cache.

Captions follow the guide's structure, `[trigger] [subject] [details], [style], [quality],
[composition]`: a model writes the subject and details, the template fills them from the file
and folder names; the trigger word goes first, then the given prefix and suffix.

A long set runs as a background job: `python -m training.captioning RUN_DIR` reads the job from
`RUN_DIR/request.json` and keeps the run-directory contract of training (status.json with its
heartbeat, train.log), with `step` counting captioned images and one `captions.jsonl` row per
caption written. A stop request (the stop-request file, or SIGTERM) stops it after the current batch;
run again, it continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, Field

# Short names for the usual captioning models on the Hugging Face hub.
CAPTION_MODELS = {
    "blip": "Salesforce/blip-image-captioning-base",
    "blip-large": "Salesforce/blip-image-captioning-large",
    "blip2": "Salesforce/blip2-opt-2.7b",
    "git": "microsoft/git-base-coco",
    "git-large": "microsoft/git-large-coco",
}
# Models that need code from their own repository or a runtime this project does not ship.
UNSUPPORTED = {
    "florence2": "Florence-2 runs code from its own repository (trust_remote_code), which this server does not "
    "execute; use blip, blip2 or git",
    "wd14": "WD14 taggers are ONNX models and need onnxruntime, which is not installed; use blip, blip2 or git",
}
MAX_NEW_TOKENS = 40  # a caption of a dozen or two words
BATCH = 8  # images per model call; progress is reported and a stop request honoured after each
_NOT_A_SUBJECT = re.compile(r"^(img|image|dsc|dscn|photo|pic|scan|screenshot|\d+)$", re.IGNORECASE)

Captioner = Callable[[list[Path]], list[str]]


log = logging.getLogger("training.captioning")


class CaptionerUnavailable(RuntimeError):
    """The captioning model cannot be used here; the message says why and what to do."""


class CaptionStyle(BaseModel):
    """What goes around each description: the trigger word first, then the prefix; the suffix last."""

    trigger_word: str | None = Field(None, description="Put first in every caption, e.g. 'xyz_style'.")
    prefix: str = Field("", description="Text after the trigger word, before the description.")
    suffix: str = Field("", description="Text at the end, e.g. ', watercolor painting'.")


class CaptionRequest(CaptionStyle):
    """generate-captions' arguments, as the server checks them (`server/captions.py`)."""

    dataset_name: str | None = Field(None, description="Dataset name, from list-datasets.")
    dataset_path: str | None = Field(None, description="Or a dataset folder (inside the allowed folders).")
    caption_model: str = Field("template", description="template, blip, blip2, git, an HF id or a folder.")
    overwrite: bool = Field(False, description="Replace existing captions too.")


class CaptionJob(CaptionStyle):
    """A request the server has checked: the images to caption and the model's folder. The server writes it
    to `request.json` in a background job's run directory, or captions it inside the call."""

    folder: str = Field(description="The dataset folder (absolute).")
    files: list[str] = Field(description="The images to caption, relative to folder.")
    caption_model: str = Field(description="'template', or the folder of an image-to-text model.")


def captioner_for(caption_model: str, folder: Path) -> Captioner:
    """The template captioner for 'template', else the image-to-text model `caption_model`."""
    if caption_model == "template":
        return lambda paths: [template_caption(p, folder) for p in paths]
    return load_captioner(caption_model)


def write_captions(
    folder: Path, paths: list[Path], describe: Captioner, style: CaptionStyle
) -> Iterator[tuple[list[tuple[str, str]], list[tuple[str, str]]]]:
    """Caption `paths` batch by batch, writing each caption next to its image (atomically).
    Yields, per batch, the (file, caption) pairs written and the (file, reason) pairs skipped:
    a file that is gone or is not a readable image is skipped, not fatal to the set."""
    from PIL import Image, UnidentifiedImageError

    from training.workspace import atomic_write_text

    for first in range(0, len(paths), BATCH):
        readable, skipped = [], []
        for path in paths[first : first + BATCH]:
            try:
                with Image.open(path) as image:
                    image.load()  # decodes: a truncated file fails here, not in the captioner's batch
                readable.append(path)
            except (OSError, UnidentifiedImageError) as exc:
                skipped.append((str(path.relative_to(folder)), f"not a readable image: {exc}"))
        written = []
        for path, description in zip(readable, describe(readable) if readable else []):
            caption = compose(description, trigger_word=style.trigger_word, prefix=style.prefix, suffix=style.suffix)
            atomic_write_text(path.with_suffix(".txt"), caption + "\n")
            written.append((str(path.relative_to(folder)), caption))
        yield written, skipped


def compose(description: str, *, trigger_word: str | None, prefix: str = "", suffix: str = "") -> str:
    """trigger + prefix + description + suffix, as one caption line."""
    parts = [p.strip() for p in (trigger_word or "", prefix, description, suffix) if p and p.strip()]
    return re.sub(r"\s+,", ",", " ".join(" ".join(parts).split()))  # a suffix may start with its comma


def template_caption(path: Path, root: Path) -> str:
    """A caption from what the file and folder names say, in the guide's structure."""
    words = [w for w in re.split(r"[\W_]+", path.stem) if w and not _NOT_A_SUBJECT.match(w)]
    if not words:
        concept = path.parent.relative_to(root).parts[0] if path.parent != root else ""
        words = [w for w in re.split(r"[\W_]+", re.sub(r"^\d+_", "", concept)) if w] or ["subject"]
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
    composition = (
        "portrait composition"
        if height > width * 1.2
        else "wide composition"
        if width > height * 1.2
        else "centered composition"
    )
    return f"{' '.join(words).lower()}, detailed, high quality, {composition}"


def find_caption_model(caption_model: str) -> Path:
    """The folder of `caption_model`: a short name (blip, blip2, git, ...), a Hugging Face id in
    the local cache, or a local folder; CaptionerUnavailable says what to do when it is not here."""
    key = caption_model.lower()
    if key in UNSUPPORTED:
        raise CaptionerUnavailable(UNSUPPORTED[key])
    local = Path(caption_model).expanduser()
    if local.is_dir():
        return local
    repo_id = CAPTION_MODELS.get(key, caption_model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # the hub raises several types for "not in the cache"
        raise CaptionerUnavailable(
            f"captioning model {caption_model!r} is not here: not a local folder and {repo_id!r} is not in the "
            f"Hugging Face cache ({HF_HUB_CACHE}). Download it once on a machine that is online "
            f"(huggingface-cli download {repo_id}), give a local folder, or use caption_model='template', "
            "which works offline."
        ) from None


def load_captioner(caption_model: str) -> Captioner:
    """A function from image files to descriptions, for the model `find_caption_model` finds."""
    folder = find_caption_model(caption_model)
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from training.models.loading import pick_device

    device = pick_device()  # the GPU where there is one: BLIP-base takes ~2 s an image on 2 CPU cores
    try:
        processor = AutoProcessor.from_pretrained(str(folder))
        model = AutoModelForImageTextToText.from_pretrained(str(folder)).eval().to(device)
    except (OSError, ValueError, KeyError) as exc:
        raise CaptionerUnavailable(f"{folder} is not an image-to-text model transformers can load: {exc}") from None

    def caption(paths: list[Path]) -> list[str]:
        images = []
        for path in paths:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        inputs = processor(images=images, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(pixel_values=inputs["pixel_values"].to(device), max_new_tokens=MAX_NEW_TOKENS)
        return [" ".join(text.split()) for text in processor.batch_decode(ids, skip_special_tokens=True)]

    return caption


def run_caption_job(run_dir: Path, stop: threading.Event) -> str:
    """Run (or continue) the captioning job in `run_dir`; returns its final state."""
    from training.background_job import job_files
    from training.workspace import append_line

    job = CaptionJob.model_validate_json((run_dir / "request.json").read_text(encoding="utf-8"))
    folder = Path(job.folder)
    done_file = run_dir / "captions.jsonl"
    done = _files_done(done_file)
    todo = [folder / name for name in job.files if name not in done]
    with job_files(run_dir, log, len(job.files)) as (_, status):
        status.update(step=len(job.files) - len(todo))
        status.start()
        try:
            log.info("captioning %d of %d images in %s with %s", len(todo), len(job.files), folder, job.caption_model)
            describe = captioner_for(job.caption_model, folder)
            started, count = time.time(), 0
            batches = write_captions(folder, todo, describe, job)
            for written, skipped in batches:
                for name, caption in written:
                    append_line(done_file, json.dumps({"file": name, "caption": caption}))
                    log.info("%s: %s", name, caption)
                for name, reason in skipped:
                    append_line(done_file, json.dumps({"file": name, "skipped": reason}))
                    log.warning("%s skipped: %s", name, reason)
                count += len(written) + len(skipped)
                rate = count / max(time.time() - started, 1e-6)
                step = len(job.files) - len(todo) + count
                status.update(step=step, it_per_s=round(rate, 3), eta_s=round((len(job.files) - step) / rate, 1))
                if stop.is_set() and step < len(job.files):
                    log.info("stopped at %d of %d images; resume continues with the rest", step, len(job.files))
                    status.finish("stopped")
                    return "stopped"
            log.info("done: all %d images captioned or skipped", len(job.files))
            status.finish("completed", eta_s=0)
            return "completed"
        except CaptionerUnavailable as exc:
            log.error("%s", exc)
            status.finish("failed", error=str(exc))
            return "failed"
        except Exception as exc:
            log.exception("captioning failed")
            status.finish("failed", error=f"{type(exc).__name__}: {exc}")
            return "failed"


def _files_done(path: Path) -> set[str]:
    """Files a previous run of the job already captioned or skipped (a torn last row is ignored)."""
    from training.workspace import read_jsonl

    return {row["file"] for row in read_jsonl(path) if isinstance(row.get("file"), str)}


def main(argv: list[str] | None = None) -> int:
    """`python -m training.captioning RUN_DIR`: the server's background captioning job."""
    from training.background_job import job_main

    return job_main("training.captioning", argv, run_caption_job)


if __name__ == "__main__":
    from training.jobs.queue import exit_as_job

    exit_as_job(main)  # a job the queue started ends its row and starts the next queued job, server or not
