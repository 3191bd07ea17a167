"""Issue 16 items 3 and 4: the loss curve and the samples grid drawn with matplotlib (imported only when a
chart is read), and tool results whose images fit a chat client's limit. The stdio side (the resources and
the tools read through the SDK's client) is in tests/test_mcp_server.py's full flow."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fast_config
from PIL import Image

from server.charts import (
    CURVE_SIZE,
    GRID_CELL,
    GRID_LABEL_WIDTH,
    GRID_MAX_ROWS,
    GRID_MIN_CELL,
    GRID_MIN_COLUMN,
    SampleTable,
    grid_size,
    loss_curve_figure,
    loss_curve_png,
    samples_grid_jpeg,
)
from server.images import RESULT_IMAGE_BUDGET, base64_size, images_within_budget

REPO = Path(__file__).resolve().parent.parent
STEPS = 10_000


def metric_rows(losses: np.ndarray) -> list[dict]:
    """metrics.jsonl's rows of a run of len(losses) steps, with a validation row every 1000 steps."""
    rows = []
    for step, loss in enumerate(losses, start=1):
        rows.append({"step": step, "loss": float(loss), "lr": 1e-4 * min(1.0, step / 500), "grad_norm": 0.5})
        if step % 1000 == 0:
            rows.append({"kind": "validation", "step": step, "loss": float(loss) + 0.02, "images": 2})
    return rows


def falling(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 0.3 * np.exp(-np.arange(STEPS) / 3000) + 0.05 + rng.normal(0, 0.02, STEPS)


def test_the_loss_curve_has_every_series_against_the_step_with_axes_and_a_legend():
    figure = loss_curve_figure(metric_rows(falling(0)))
    figure.canvas.draw()
    losses, rates, norms = figure.axes
    assert rates.get_xlabel() == "step"
    assert (losses.get_ylabel(), rates.get_ylabel(), norms.get_ylabel()) == ("loss", "learning rate", "gradient norm")
    legends = [text.get_text() for axes in (losses, rates) for text in axes.get_legend().get_texts()]
    assert legends == ["loss", "loss, smoothed (EMA 0.9)", "validation loss", "learning rate", "gradient norm"]
    raw, bold, validation = losses.get_lines()
    assert raw.get_alpha() < 0.5 < bold.get_linewidth() / raw.get_linewidth()  # raw faint, smoothed bold
    assert len(raw.get_xdata()) == STEPS and list(validation.get_xdata()) == list(range(1000, STEPS + 1, 1000))
    ticks = [label.get_text() for label in rates.get_xticklabels() if label.get_text()]
    assert "10000" in [tick.replace(",", "") for tick in ticks] or len(ticks) >= 4, ticks


def test_the_loss_curve_png_is_drawn_from_the_losses_in_its_plot_area():
    """Two runs that differ only in their losses: their PNGs differ inside the loss panel and nowhere in the
    learning-rate panel. The old hand-drawn curve was 720 x 360 without tick labels."""
    first, second = (metric_rows(falling(seed)) for seed in (0, 1))
    pictures = [np.asarray(Image.open(io.BytesIO(loss_curve_png(rows))).convert("RGB")) for rows in (first, second)]
    assert pictures[0].shape == pictures[1].shape == (CURVE_SIZE[1], CURVE_SIZE[0], 3)
    figure = loss_curve_figure(first)
    figure.canvas.draw()
    differs = np.any(pictures[0] != pictures[1], axis=-1)
    for axes, expected in zip(figure.axes[:2], (True, False)):
        box = axes.get_window_extent()  # display pixels, from the bottom left
        top, bottom = CURVE_SIZE[1] - int(box.y1), CURVE_SIZE[1] - int(box.y0)
        assert differs[top:bottom, int(box.x0) : int(box.x1)].any() == expected
    assert differs.any()


def test_the_smoothed_loss_is_the_trainers(tmp_path, shapes):
    """A real run's metrics.jsonl, smoothed by the curve, ends at the loss its status.json shows."""
    from training.trainer import run_training

    result = run_training(fast_config(shapes, steps=6), tmp_path / "run")
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    status = json.loads((result.run_dir / "status.json").read_text())
    bold = loss_curve_figure(rows).axes[0].get_lines()[1]
    assert list(bold.get_xdata()) == list(range(1, 7))
    assert bold.get_ydata()[-1] == pytest.approx(status["loss"], rel=1e-9)


def test_the_server_loads_matplotlib_only_when_a_chart_is_read(tmp_path):
    code = (
        "import sys; from pathlib import Path; import server.main; from server.app import build_server; "
        f"build_server(Path({str(tmp_path)!r})); print('matplotlib' in sys.modules, end=' '); "
        "from server.charts import loss_curve_png; loss_curve_png([]); print('matplotlib' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]


def sample_folder(folder: Path, steps: list[int], prompts: int, picture) -> SampleTable:
    """samples/ as the trainer writes it: step{step}_p{index}.png and index.jsonl (the last prompt the
    control); `picture(step, index)` gives each image."""
    folder.mkdir()
    rows = []
    for step in steps:
        for index in range(prompts):
            name = f"step{step:06d}_p{index}.png"
            picture(step, index).save(folder / name)
            control = index == prompts - 1
            prompt = "a red circle on a wide green meadow under a sky" if control else f"xyz_shape prompt {index}"
            rows.append({"step": step, "prompt_index": index, "prompt": prompt, "file": name, "control": control})
    return SampleTable.of(folder, rows)


def flat(step: int, index: int) -> Image.Image:
    return Image.new("RGB", (512, 512), (40 + 60 * index, 30 + 40 * (step // 100), 200))


def noise(step: int, index: int) -> Image.Image:
    """Random pixels: the worst case for PNG and JPEG alike."""
    rng = np.random.default_rng(step * 100 + index)
    return Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))


def test_the_samples_grid_has_a_row_per_step_and_a_column_per_prompt(tmp_path):
    steps = [0, 100, 200]
    table = sample_folder(tmp_path / "samples", steps, 3, flat)
    grid = np.asarray(Image.open(io.BytesIO(samples_grid_jpeg(table))).convert("RGB")).astype(int)
    width, height = grid_size(3, len(steps), GRID_CELL)
    assert (grid.shape[1], grid.shape[0]) == (width, height)
    assert width == GRID_LABEL_WIDTH + 3 * (max(GRID_CELL, GRID_MIN_COLUMN) + 4)  # 256 px cells: 512 px shrunk
    column = max(GRID_CELL, GRID_MIN_COLUMN) + 4
    for row, step in enumerate(steps):
        centre_y = height - (len(steps) - row) * (GRID_CELL + 4) + GRID_CELL // 2
        for index in range(3):
            centre_x = GRID_LABEL_WIDTH + index * column + column // 2
            expected = flat(step, index).getpixel((0, 0))
            assert np.abs(grid[centre_y, centre_x] - expected).max() <= 6, (step, index)
    left_edge = GRID_LABEL_WIDTH + 2 * column - 2  # the control column's frame
    red = grid[height // 2 :, left_edge - 1 : left_edge + 2]
    assert ((red[..., 0] > 180) & (red[..., 1] < 90) & (red[..., 2] < 90)).any()
    labels = grid[height - len(steps) * (GRID_CELL + 4) :, :GRID_LABEL_WIDTH]
    assert (labels < 100).any()  # the step labels are written


def test_a_large_grid_of_noise_is_thinned_to_the_budget(tmp_path):
    steps = list(range(0, 4000, 100))
    table = sample_folder(tmp_path / "samples", steps, 4, noise)
    data = samples_grid_jpeg(table)
    assert base64_size(data) <= RESULT_IMAGE_BUDGET
    with Image.open(io.BytesIO(data)) as grid:
        size = grid.size
    cells = range(GRID_MIN_CELL, GRID_CELL + 1)
    fits = [(rows, cell) for rows in range(2, GRID_MAX_ROWS + 1) for cell in cells if grid_size(4, rows, cell) == size]
    assert fits, size  # a grid of at most GRID_MAX_ROWS of the 40 steps


def result_of(folder: Path, picture, where_all: str) -> tuple[list, list]:
    """images_within_budget's content for eight 512 px images `picture` draws, and its images as a client
    receives them."""
    shown = []
    for index in range(8):
        shown.append((f"image {index}", folder / f"image_{index}.png"))
        picture(0, index).save(shown[-1][1])
    content = images_within_budget(shown, where_all)
    return content, [item.to_image_content() for item in content if not isinstance(item, str)]


def test_a_result_of_noise_images_stays_within_the_budget_and_says_what_was_left_out(tmp_path):
    content, images = result_of(tmp_path, noise, "See lora://x/all.")
    assert sum(len(image.data) for image in images) <= RESULT_IMAGE_BUDGET
    assert 0 < len(images) < 8 and {image.mime_type for image in images} == {"image/jpeg"}
    assert content[-1].startswith(f"{8 - len(images)} of 8 images left out") and "lora://x/all" in content[-1]
    for image in images:
        with Image.open(io.BytesIO(base64.b64decode(image.data))) as decoded:
            assert decoded.size == (384, 384)


def test_flat_images_stay_png_and_none_is_left_out(tmp_path):
    content, images = result_of(tmp_path, flat, "unused")
    assert len(images) == 8 and {image.mime_type for image in images} == {"image/png"}
    assert not [item for item in content if isinstance(item, str) and "left out" in item]


def test_photo_like_samples_through_the_stdio_client_stay_within_the_budget(tmp_path, tiny_sd15, shapes):
    """A real job's samples (five test prompts and the control, at steps 0 and 2), replaced on disk by
    512 px noise as photographs stand in for: get-training-samples leaves some out and says so, naming the
    samples-grid resource, which fits the budget too; replaced by flat images, every one is sent, as PNG."""
    from test_mcp_server import run_session, wait_for_state

    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "models").symlink_to(tiny_sd15.parent)
    config = {"name": "many", "model_name": "builtin:tiny-sd15", "dataset_path": str(shapes), "resolution": 64}
    config |= {"trigger_word": "xyz_shape", "test_prompts": [f"xyz_shape shape {i}" for i in range(5)]}
    config |= {"steps": 2, "sample_every": 2, "sample_steps": 2}

    async def script(session):
        created = await session.call_tool("create-training-config", config)
        assert not created.is_error, created.content
        job_id = (await session.call_tool("start-training", {"config_name": "many"})).structured_content["job_id"]
        status = await wait_for_state(session, job_id, ("completed", "failed", "interrupted"))
        assert status["state"] == "completed", status
        samples = Path(status["run_dir"]) / "samples"
        pictures = sorted(samples.glob("step*.png"))
        assert len(pictures) == 12
        results = {}
        for kind, picture in (("noise", noise), ("flat", flat)):
            for index, path in enumerate(pictures):
                picture(index, index % 6).save(path)
            results[kind] = await session.call_tool("get-training-samples", {"job_id": job_id})
            if kind == "noise":
                results["grid"] = await session.read_resource(f"lora://jobs/{job_id}/samples-grid")
        return job_id, results

    job_id, results = run_session(workspace, script)
    noisy = [item for item in results["noise"].content if item.type == "image"]
    assert sum(len(image.data) for image in noisy) <= RESULT_IMAGE_BUDGET and 0 < len(noisy) < 6
    said = results["noise"].content[-1].text
    assert said.startswith(f"{6 - len(noisy)} of 6 images left out") and f"lora://jobs/{job_id}/samples-grid" in said
    assert len(results["grid"].contents[0].blob) <= RESULT_IMAGE_BUDGET
    flats = [item for item in results["flat"].content if item.type == "image"]
    assert len(flats) == 6 and {image.mime_type for image in flats} == {"image/png"}
