"""Automatic captions: a `template` captioner that works offline, and image-to-text models
(BLIP, BLIP-2, GIT, ...) through transformers, from a local folder or the local HF cache.

Captions follow the guide's structure, `[trigger] [subject] [details], [style], [quality],
[composition]`: a model writes the subject and details, the template fills them from the file
and folder names; the trigger word goes first, then the given prefix and suffix.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

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
_NOT_A_SUBJECT = re.compile(r"^(img|image|dsc|dscn|photo|pic|scan|screenshot|\d+)$", re.IGNORECASE)

Captioner = Callable[[list[Path]], list[str]]


class CaptionerUnavailable(RuntimeError):
    """The captioning model cannot be used here; the message says why and what to do."""


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


def load_captioner(caption_model: str) -> Captioner:
    """A function from image files to descriptions, for `caption_model`: a short name (blip, blip2,
    git, ...), a Hugging Face id in the local cache, or a local folder."""
    key = caption_model.lower()
    if key in UNSUPPORTED:
        raise CaptionerUnavailable(UNSUPPORTED[key])
    folder = _model_folder(caption_model)
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(folder))
        model = AutoModelForImageTextToText.from_pretrained(str(folder)).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise CaptionerUnavailable(f"{folder} is not an image-to-text model transformers can load: {exc}") from None

    def caption(paths: list[Path]) -> list[str]:
        images = []
        for path in paths:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        inputs = processor(images=images, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=MAX_NEW_TOKENS)
        return [" ".join(text.split()) for text in processor.batch_decode(ids, skip_special_tokens=True)]

    return caption


def _model_folder(caption_model: str) -> Path:
    local = Path(caption_model).expanduser()
    if local.is_dir():
        return local
    repo_id = CAPTION_MODELS.get(caption_model.lower(), caption_model)
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
