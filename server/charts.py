"""The charts behind the `loss-curve` and `samples-grid` resources, drawn with matplotlib's Agg canvas.

matplotlib is imported inside the functions, when such a resource is read: the server imports this module
at start-up, and a session that never reads a chart does not load matplotlib and its fonts. The figures
are `matplotlib.figure.Figure` objects on their own canvas, never pyplot's global state, so two resources
read at once (each in a worker thread) do not share a figure.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from server.images import RESULT_IMAGE_BUDGET, base64_size, encoded
from training.run_files import LOSS_SMOOTHING, smoothed_series

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

DPI = 100
CURVE_SIZE = (1000, 640)  # pixels: wide enough that 10,000 steps still show their spread
LOSS, VALIDATION, RATE, NORM = "tab:blue", "tab:green", "tab:orange", "tab:purple"  # matplotlib's own palette

# The samples grid: a row per sampling step, a column per prompt, as kohya's and ai-toolkit's grids.
GRID_CELL = 256  # the largest side of an image in the grid (smaller samples are not enlarged)
GRID_MIN_CELL = 96  # below this a 512 px sample shows nothing; rows are left out instead
GRID_MIN_COLUMN = 160  # a column is at least this wide, so its prompt has ~22 characters a line
GRID_GAP = 4
GRID_LABEL_WIDTH = 90  # the row labels ("step 12000")
GRID_TITLE_HEIGHT = 28
GRID_HEADER_LINES = 3  # the prompt over a column, wrapped, then shortened with an ellipsis
GRID_LINE_HEIGHT = 14  # 9 pt at 100 dpi is 12.5 px
GRID_HEADER_HEIGHT = GRID_HEADER_LINES * GRID_LINE_HEIGHT + 8
GRID_MAX_ROWS = 12  # more sampling steps are thinned to this (the first and the last kept)
CHARACTER_WIDTH = 7  # DejaVu Sans at 9 pt, a mean over lower-case text, in pixels
CONTROL = "tab:red"


def loss_curve_png(rows: list[dict]) -> bytes:
    """`rows` (metrics.jsonl's) as a PNG of CURVE_SIZE: see loss_curve_figure."""
    buffer = io.BytesIO()
    loss_curve_figure(rows).savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def loss_curve_figure(rows: list[dict]) -> Figure:
    """Over the step: the loss raw (faint) and smoothed as the trainer smooths it (bold), the validation loss;
    below, the learning rate and (right scale) the gradient norm before clipping."""
    figure = _figure(*CURVE_SIZE, layout="constrained")
    losses, rates = figure.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    norms = rates.twinx()
    steps = _series(rows, "loss")
    losses.plot(*_columns(steps), color=LOSS, alpha=0.3, linewidth=0.8, label="loss")
    ema = smoothed_series([loss for _, loss in steps])
    losses.plot(
        [step for step, _ in steps], ema, color=LOSS, linewidth=2.2, label=f"loss, smoothed (EMA {LOSS_SMOOTHING})"
    )
    validation = _series(rows, "loss", kind="validation")
    losses.plot(*_columns(validation), "o-", color=VALIDATION, markersize=4, label="validation loss")
    rates.plot(*_columns(_series(rows, "lr")), color=RATE, label="learning rate")
    norms.plot(*_columns(_series(rows, "grad_norm")), color=NORM, alpha=0.6, linewidth=0.8, label="gradient norm")
    losses.set_title("training loss" if steps else "training loss: no steps yet")
    losses.set_ylabel("loss")
    rates.set_ylabel("learning rate")
    rates.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    norms.set_ylabel("gradient norm")
    rates.set_xlabel("step")
    losses.legend(loc="upper right")
    handles = rates.get_legend_handles_labels()[0] + norms.get_legend_handles_labels()[0]
    rates.legend(handles=handles, loc="upper right")
    for axes in (losses, rates):
        axes.grid(alpha=0.3)
    return figure


def _series(rows: list[dict], key: str, kind: str | None = None) -> list[tuple[int, float]]:
    """(step, value) of the rows of `kind` (None: the per-step rows) whose `key` is a finite number."""
    return [
        (row["step"], float(row[key]))
        for row in rows
        if row.get("kind") == kind
        and isinstance(row.get("step"), int)
        and isinstance(row.get(key), int | float)
        and math.isfinite(row[key])
    ]


def _columns(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [step for step, _ in points], [value for _, value in points]


class SampleTable(NamedTuple):
    """A job's samples as the grid lays them out: samples/index.jsonl's rows by step and prompt."""

    steps: list[int]
    prompts: list[tuple[str, bool]]  # (text, is the control prompt) by prompt index
    files: dict[tuple[int, int], Path]  # (step, prompt index) -> the image, for those whose file is there

    @classmethod
    def of(cls, folder: Path, rows: list[dict]) -> SampleTable:
        prompts: dict[int, tuple[str, bool]] = {}
        files = {}
        for row in rows:
            prompts.setdefault(row["prompt_index"], (row["prompt"], bool(row.get("control"))))
            if (folder / row["file"]).is_file():  # not when deleted by hand: the grid shows the others
                files[row["step"], row["prompt_index"]] = folder / row["file"]
        return cls(sorted({step for step, _ in files}), [prompts[i] for i in sorted(prompts)], files)


def samples_grid_jpeg(table: SampleTable, budget: int = RESULT_IMAGE_BUDGET) -> bytes:
    """The grid as JPEG within `budget` characters of base64: at most GRID_MAX_ROWS steps, cells of the
    samples' size up to GRID_CELL, shrunk by a quarter while over budget, then every other row left out."""
    from training.image_files import upright_image

    shown = _spread(table.steps, GRID_MAX_ROWS)
    images = {}
    for (step, index), path in table.files.items():
        if step in shown:  # only these are read: 100 steps of 1024 px samples would take ~2 GB
            with upright_image(path) as image:
                image.thumbnail((GRID_CELL, GRID_CELL))
                images[step, index] = image.convert("RGB")
    cell = max(max(image.size) for image in images.values())
    while True:
        data = encoded(_grid(table, images, shown, cell), "jpeg")
        if base64_size(data) <= budget or (cell <= GRID_MIN_CELL and len(shown) <= 2):
            return data
        if cell > GRID_MIN_CELL:
            cell = max(GRID_MIN_CELL, cell * 3 // 4)
        else:
            shown = _spread(shown, max(2, len(shown) // 2))


def grid_size(prompts: int, rows: int, cell: int) -> tuple[int, int]:
    """(width, height) in pixels of a grid of `prompts` columns and `rows` steps, images at most `cell` pixels."""
    width = GRID_LABEL_WIDTH + prompts * (max(cell, GRID_MIN_COLUMN) + GRID_GAP)
    return width, GRID_TITLE_HEIGHT + GRID_HEADER_HEIGHT + rows * (cell + GRID_GAP)


def _grid(table: SampleTable, images: dict[tuple[int, int], Image.Image], shown: list[int], cell: int) -> Image.Image:
    """The grid of the `shown` steps: matplotlib places each image at its pixel and writes the labels."""
    import numpy as np
    from matplotlib.patches import Rectangle
    from PIL import Image

    width, height = grid_size(len(table.prompts), len(shown), cell)
    column = max(cell, GRID_MIN_COLUMN) + GRID_GAP
    figure = _figure(width, height)

    def text(x: float, top: float, words: str, **style) -> None:  # pixels from the top-left corner
        figure.text(x / width, 1 - top / height, words, va="top", **{"fontsize": 9, **style})

    more = f" ({len(shown)} of {len(table.steps)} steps)" if len(shown) < len(table.steps) else ""
    text(GRID_GAP, 6, f"samples by step and prompt{more}", fontsize=10, weight="bold")  # fits 2 columns of 64 px
    for index, (prompt, control) in enumerate(table.prompts):
        left = GRID_LABEL_WIDTH + index * column
        label = ("control, no trigger word: " if control else f"{index}: ") + prompt
        lines = textwrap.wrap(label, column // CHARACTER_WIDTH, max_lines=GRID_HEADER_LINES, placeholder=" …")
        text(left, GRID_TITLE_HEIGHT, "\n".join(lines), color=CONTROL if control else "black", linespacing=1.1)
        if control:  # framed: the column a LoRA should leave alone (style bleeding shows here)
            below_title = (height - GRID_TITLE_HEIGHT + 2) / height
            frame = ((left - 2) / width, 0), column / width, below_title
            figure.add_artist(Rectangle(*frame, transform=figure.transFigure, fill=False, edgecolor=CONTROL, lw=2))
    for row, step in enumerate(shown):
        top = GRID_TITLE_HEIGHT + GRID_HEADER_HEIGHT + row * (cell + GRID_GAP)
        text(GRID_GAP, top + cell / 2 - 6, f"step {step}", weight="bold")
        for index in range(len(table.prompts)):
            if (image := images.get((step, index))) is None:
                continue  # e.g. a prompt added on resume has no image at the earlier steps
            image = image.copy()
            image.thumbnail((cell, cell))
            left = GRID_LABEL_WIDTH + index * column + (column - GRID_GAP - image.width) // 2
            figure.figimage(np.asarray(image), xo=left, yo=height - top - image.height, origin="upper")
    figure.canvas.draw()
    return Image.frombuffer("RGBA", figure.canvas.get_width_height(), figure.canvas.buffer_rgba()).convert("RGB")


def _figure(width: int, height: int, **options) -> Figure:
    """A figure of `width` x `height` pixels on its own Agg canvas. Agg truncates the size in inches times
    the dpi to whole pixels, and 57 / 100 * 100 is 56.99999999999999: half a pixel more keeps the size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=((width + 0.5) / DPI, (height + 0.5) / DPI), dpi=DPI, facecolor="white", **options)
    FigureCanvasAgg(figure)
    return figure


def _spread(steps: list[int], count: int) -> list[int]:
    """`count` of `steps` evenly spread, the first and the last among them (all when there are fewer)."""
    if len(steps) <= count:
        return steps
    return [steps[round(i * (len(steps) - 1) / (count - 1))] for i in range(count)]
