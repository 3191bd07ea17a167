"""The captioning models: what `caption_model` names, where its files are, and a function from image files
to descriptions for it (`load_captioner`). One module per kind, each with a `load(folder, prompt)`:

- `image_to_text`: BLIP, BLIP-2, GIT and other image-to-text models transformers loads as they are, and
  image-text-to-text chat models (JoyCaption, LLaVA class), asked `caption_prompt`;
- `florence2`: Florence-2, native in transformers (no code from the model's repository);
- `qwen_vl`: Qwen2-VL and Qwen2.5-VL chat models, asked `caption_prompt`, without their processor class;
- `wd14`: WD14-style taggers (SmilingWolf's ONNX releases), through onnxruntime (the `wd14` extra).

This module imports neither torch nor onnxruntime: the MCP server checks a request with it.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

# Short names for the usual captioning models on the Hugging Face hub.
CAPTION_MODELS = {
    "blip": "Salesforce/blip-image-captioning-base",
    "blip-large": "Salesforce/blip-image-captioning-large",
    # BLIP-2 OPT-2.7b: about 3.9B parameters, ~7.7 GB of weights in fp16 (15.5 GB in fp32).
    "blip2": "Salesforce/blip2-opt-2.7b",
    "git": "microsoft/git-base-coco",
    "git-large": "microsoft/git-large-coco",
    # The transformers-native conversions: microsoft/Florence-2-* need their repository's own code.
    "florence2": "florence-community/Florence-2-large",
    "florence2-base": "florence-community/Florence-2-base",
    "wd14": "SmilingWolf/wd-swinv2-tagger-v3",
}
DEFAULT_CAPTION_PROMPT = (
    "Write one caption for this image, as a training caption for an image model: one or two plain sentences, "
    "the main subject first, then its details, the style and the composition. No preamble, no lists."
)
WD14_FILES = ("model.onnx", "selected_tags.csv")
WD14_INSTALL = 'pip install "lora-mcp[wd14]" (or pip install "onnxruntime>=1.17")'
MAX_NEW_TOKENS = 40  # a BLIP/GIT caption of a dozen or two words

Captioner = Callable[[list[Path]], list[str]]


class CaptionerUnavailable(RuntimeError):
    """The captioning model cannot be used here; the message says why and what to do."""


def find_caption_model(caption_model: str) -> Path:
    """The folder of `caption_model`: a short name (blip, blip2, git, florence2, wd14, ...), a Hugging Face id
    in the local cache, or a local folder; CaptionerUnavailable says what to do when it is not here or
    cannot run here (a WD14 tagger without onnxruntime)."""
    local = Path(caption_model).expanduser()
    folder = local if local.is_dir() else _cached(CAPTION_MODELS.get(caption_model.lower(), caption_model))
    if is_tagger(folder) and importlib.util.find_spec("onnxruntime") is None:
        raise CaptionerUnavailable(
            f"{folder} is a WD14 tagger (ONNX), which needs onnxruntime: install it with {WD14_INSTALL}, "
            "or use a captioning model such as florence2, blip or git"
        )
    return folder


def _cached(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # the hub raises several types for "not in the cache"
        raise CaptionerUnavailable(
            f"captioning model {repo_id!r} is not here: not a local folder and not in the Hugging Face cache "
            f"({HF_HUB_CACHE}). Download it once on a machine that is online (huggingface-cli download {repo_id}), "
            "give a local folder, or use caption_model='template', which works offline."
        ) from None


def is_tagger(folder: Path) -> bool:
    """A WD14-style tagger's folder, laid out as SmilingWolf's releases are."""
    return all((folder / name).is_file() for name in WD14_FILES)


def model_type(folder: Path) -> str | None:
    """config.json's model_type, or None (no config, or not JSON)."""
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def load_captioner(folder: Path, prompt: str | None = None) -> Captioner:
    """A function from image files to descriptions for the model in `folder`, by its kind; `prompt` is the
    instruction a chat model is given (DEFAULT_CAPTION_PROMPT when None); the other kinds take none."""
    if is_tagger(folder):
        from training.captioners import wd14

        return wd14.load(folder)
    if model_type(folder) == "florence2":
        from training.captioners import florence2

        return florence2.load(folder)
    if model_type(folder) in ("qwen2_vl", "qwen2_5_vl"):
        from training.captioners import qwen_vl

        return qwen_vl.load(folder, prompt or DEFAULT_CAPTION_PROMPT)
    from training.captioners import image_to_text

    return image_to_text.load(folder, prompt or DEFAULT_CAPTION_PROMPT)


def rgb_images(paths: list[Path]) -> list:
    """The images as PIL RGB images, upright (EXIF orientation applied)."""
    from training.image_files import upright_image

    images = []
    for path in paths:
        with upright_image(path) as image:
            images.append(image.convert("RGB"))
    return images
