"""Automatic captions: a `template` captioner that works offline, and the captioning models of
`training.captioners` (BLIP, BLIP-2, GIT, Florence-2, WD14 taggers, image-text-to-text chat models),
from a local folder or the local HF cache.

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
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, Field

from training.captioners import (
    DEFAULT_CAPTION_PROMPT,
    Captioner,
    CaptionerUnavailable,
    is_tagger,
    load_captioner,
)

BATCH = 8  # images per model call; progress is reported and a stop request honoured after each
_NOT_A_SUBJECT = re.compile(r"^(img|image|dsc|dscn|photo|pic|scan|screenshot|\d+)$", re.IGNORECASE)

log = logging.getLogger("training.captioning")


class CaptionStyle(BaseModel):
    """What goes around each description: the trigger word first, then the prefix; the suffix last."""

    trigger_word: str | None = Field(None, description="Put first in every caption, e.g. 'xyz_style'.")
    prefix: str = Field("", description="Text after the trigger word, before the description.")
    suffix: str = Field("", description="Text at the end, e.g. ', watercolor painting'.")


class CaptionRequest(CaptionStyle):
    """generate-captions' arguments, as the server checks them (`server/captions.py`)."""

    dataset_name: str | None = Field(None, description="Dataset name, from list-datasets.")
    dataset_path: str | None = Field(None, description="Or a dataset folder (inside the allowed folders).")
    caption_model: str = Field(
        "template",
        description="'template': offline, from the file and folder names. 'blip' (BLIP-base, 0.22B parameters, "
        "~1 GB) or 'git' (GIT-base, ~0.7 GB): a short sentence, quick on a CPU. 'blip2' (BLIP-2 OPT-2.7b: about "
        "3.9B parameters, ~7.7 GB in fp16 on a GPU, ~15.5 GB in fp32 on a CPU): better sentences, wants a GPU. "
        "'florence2' (Florence-2-large, 0.77B; 'florence2-base', 0.23B): a detailed one- or two-sentence "
        "description, the usual choice for photos and styles. 'wd14' (a WD14 tagger, ONNX, needs the wd14 "
        "extra): Danbooru tags joined by commas, for anime and illustration. A local folder or cached Hugging "
        "Face id of an image-text-to-text chat model (JoyCaption, Qwen2.5-VL, LLaVA class): asked caption_prompt. "
        "Any other cached id or folder of an image-to-text model works too.",
    )
    caption_prompt: str = Field(
        DEFAULT_CAPTION_PROMPT,
        min_length=1,
        max_length=2000,
        description="The instruction a chat model (JoyCaption, Qwen2.5-VL, ...) is given with each image; the "
        "other models take none.",
    )
    overwrite: bool = Field(False, description="Replace existing captions too.")


class CaptionJob(CaptionStyle):
    """A request the server has checked: the images to caption and the model's folder. The server writes it
    to `request.json` in a background job's run directory, or captions it inside the call."""

    folder: str = Field(description="The dataset folder (absolute).")
    files: list[str] = Field(description="The images to caption, relative to folder.")
    caption_model: str = Field(description="'template', or the folder of a captioning model.")
    caption_prompt: str = Field(DEFAULT_CAPTION_PROMPT, description="A chat model's caption instruction.")


def captioner_for(caption_model: str, folder: Path, prompt: str = DEFAULT_CAPTION_PROMPT) -> Captioner:
    """The template captioner for 'template', else the captioning model in the folder `caption_model`."""
    if caption_model == "template":
        return lambda paths: [template_caption(p, folder) for p in paths]
    return load_captioner(Path(caption_model), prompt)


def separator_for(caption_model: str) -> str:
    """What sets the trigger word and prefix off from the description: a comma before a tagger's tags, so that
    the trigger is an item of its own where shuffle_caption and keep_tokens count comma-separated items; else a
    space, as the guide writes `[trigger] [subject] [details], ...`."""
    return ", " if caption_model != "template" and is_tagger(Path(caption_model)) else " "


def write_captions(
    folder: Path, paths: list[Path], describe: Captioner, style: CaptionStyle, separator: str = " "
) -> Iterator[tuple[list[tuple[str, str]], list[tuple[str, str]]]]:
    """Caption `paths` batch by batch, writing each caption next to its image (atomically).
    Yields, per batch, the (file, caption) pairs written and the (file, reason) pairs skipped:
    a file that is gone or is not a readable image is skipped, not fatal to the set."""
    from PIL import UnidentifiedImageError

    from training.image_files import upright_image
    from training.workspace import atomic_write_text

    for first in range(0, len(paths), BATCH):
        readable, skipped = [], []
        for path in paths[first : first + BATCH]:
            try:
                with upright_image(path) as image:
                    image.load()  # decodes: a truncated file fails here, not in the captioner's batch
                readable.append(path)
            except (OSError, UnidentifiedImageError) as exc:
                skipped.append((str(path.relative_to(folder)), f"not a readable image: {exc}"))
        written = []
        for path, description in zip(readable, describe(readable) if readable else []):
            caption = compose(
                description,
                trigger_word=style.trigger_word,
                prefix=style.prefix,
                suffix=style.suffix,
                separator=separator,
            )
            atomic_write_text(path.with_suffix(".txt"), caption + "\n")
            written.append((str(path.relative_to(folder)), caption))
        yield written, skipped


def compose(
    description: str, *, trigger_word: str | None, prefix: str = "", suffix: str = "", separator: str = " "
) -> str:
    """trigger + prefix, `separator`, description + suffix, as one caption line."""
    head = " ".join(p.strip() for p in (trigger_word or "", prefix) if p and p.strip())
    text = separator.join(p for p in (head, description.strip()) if p) + " " + suffix
    return re.sub(r"\s+,", ",", " ".join(text.split()))  # a suffix may start with its comma


def template_caption(path: Path, root: Path) -> str:
    """A caption from what the file and folder names say, in the guide's structure."""
    words = [w for w in re.split(r"[\W_]+", path.stem) if w and not _NOT_A_SUBJECT.match(w)]
    if not words:
        concept = path.parent.relative_to(root).parts[0] if path.parent != root else ""
        words = [w for w in re.split(r"[\W_]+", re.sub(r"^\d+_", "", concept)) if w] or ["subject"]
    from PIL import Image

    from training.image_files import upright_size

    with Image.open(path) as image:
        width, height = upright_size(image)  # a phone's portrait photo is stored as landscape pixels
    composition = (
        "portrait composition"
        if height > width * 1.2
        else "wide composition"
        if width > height * 1.2
        else "centered composition"
    )
    return f"{' '.join(words).lower()}, detailed, high quality, {composition}"


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
            describe = captioner_for(job.caption_model, folder, job.caption_prompt)
            started, count = time.time(), 0
            batches = write_captions(folder, todo, describe, job, separator_for(job.caption_model))
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
