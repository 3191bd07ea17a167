"""WD14-style taggers (SmilingWolf's wd-*-tagger releases): an ONNX image classifier over Danbooru tags,
run by onnxruntime (the `wd14` extra). The folder holds `model.onnx` and `selected_tags.csv` (tag_id, name,
category, count); the model takes NHWC float images, BGR, 0-255, at the side its input says (448), and
gives one sigmoid probability per row of the CSV.

A caption is the tags that pass their category's threshold, characters first, then general tags, each by
probability, joined by ", " (the trigger word goes first, as for every captioner). Rating tags (general,
sensitive, ...) say nothing a LoRA should learn and are dropped.
"""

from __future__ import annotations

import csv
from pathlib import Path

from training.captioners import WD14_INSTALL, Captioner, CaptionerUnavailable

# SmilingWolf's own defaults (the wd-tagger demo Space), which kohya's tag_images_by_wd14_tagger.py uses too:
# a general tag at 0.35 probability, a character only at 0.85 (a wrong name teaches the wrong identity).
GENERAL_THRESHOLD = 0.35
CHARACTER_THRESHOLD = 0.85
RATING, GENERAL, CHARACTER = 9, 0, 4  # selected_tags.csv's category numbers
# Tags that are faces drawn with underscores: their underscores are the face, not word breaks (the demo's list).
KAOMOJI = {
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
    "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
}  # fmt: skip


def load(folder: Path) -> Captioner:
    try:
        import onnxruntime
    except ImportError:
        raise CaptionerUnavailable(f"the WD14 tagger in {folder} needs onnxruntime: {WD14_INSTALL}") from None
    import numpy as np

    tags = read_tags(folder / "selected_tags.csv")
    preferred = ("CUDAExecutionProvider", "CPUExecutionProvider")  # the GPU with onnxruntime-gpu, else the CPU
    providers = [p for p in preferred if p in onnxruntime.get_available_providers()]
    try:
        session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for a bad or foreign file
        raise CaptionerUnavailable(f"{folder / 'model.onnx'} is not an ONNX model onnxruntime can run: {exc}") from None
    model_input = session.get_inputs()[0]
    side = model_input.shape[1]
    if not isinstance(side, int) or len(tags) != session.get_outputs()[0].shape[-1]:
        raise CaptionerUnavailable(
            f"{folder} is not laid out as a WD14 tagger: its input must be (batch, side, side, 3) and its output "
            f"one probability per row of selected_tags.csv ({len(tags)} rows)"
        )

    def caption(paths: list[Path]) -> list[str]:
        batch = np.stack([tagger_input(path, side) for path in paths])
        probabilities = session.run(None, {model_input.name: batch})[0]
        return [", ".join(chosen_tags(tags, row)) for row in probabilities]

    return caption


def read_tags(path: Path) -> list[tuple[str, int]]:
    """(tag as a caption writes it, category) per row of selected_tags.csv, in the model's output order."""
    with path.open(encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))
    try:
        return [(_caption_tag(row["name"]), int(row["category"])) for row in rows]
    except (KeyError, ValueError) as exc:
        raise CaptionerUnavailable(f"{path} needs the columns name and category (a number): {exc}") from None


def _caption_tag(name: str) -> str:
    return name if name in KAOMOJI else name.replace("_", " ")


def chosen_tags(tags: list[tuple[str, int]], probabilities) -> list[str]:
    """The character tags at CHARACTER_THRESHOLD or above, then the general ones at GENERAL_THRESHOLD or
    above, each group most probable first; rating and other categories are left out."""
    chosen = []
    for category, threshold in ((CHARACTER, CHARACTER_THRESHOLD), (GENERAL, GENERAL_THRESHOLD)):
        passed = [(p, tag) for (tag, kind), p in zip(tags, probabilities) if kind == category and p >= threshold]
        chosen += [tag for _, tag in sorted(passed, key=lambda pair: -pair[0])]
    return chosen


def tagger_input(path: Path, side: int):
    """The image as the tagger was trained on it: transparency on white, padded to a white square, resized
    to side x side (bicubic), as float32 BGR 0-255, HWC."""
    import numpy as np
    from PIL import Image

    from training.image_files import upright_image

    with upright_image(path) as image:
        rgba = image.convert("RGBA")
    flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)
    square = Image.new("RGB", (max(rgba.size),) * 2, (255, 255, 255))
    square.paste(flat.convert("RGB"), ((square.width - rgba.width) // 2, (square.height - rgba.height) // 2))
    if square.width != side:
        square = square.resize((side, side), Image.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]
