"""DatasetService: uploads judged file by file into a temporary workspace, and the listing."""

from __future__ import annotations

import base64
import io
import random
import re
from pathlib import Path

import pytest
from PIL import Image

from server.datasets import (
    MAX_IMAGES_PER_CALL,
    DatasetService,
    DatasetSummary,
    FileOutcome,
    UploadImage,
    UploadResult,
)
from server.errors import ServiceError
from training.data.dataset import locate_dataset, scan_dataset

BAD_NAMES = ["../d", "a/b", "/abs", "", ".."]


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (16, 12), color=(200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def noisy_png(size: tuple[int, int] = (64, 64)) -> bytes:
    """A PNG whose pixel data does not compress away, so cutting it leaves a truncated image."""
    buffer = io.BytesIO()
    noise = random.Random(0).randbytes(size[0] * size[1] * 3)
    Image.frombytes("RGB", size, noise).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def service(tmp_path) -> DatasetService:
    return DatasetService(tmp_path)


# --- good uploads --------------------------------------------------------------------------------


def test_good_batch_saves_images_and_captions(service, tmp_path):
    png, jpeg = image_bytes("PNG", (16, 12)), image_bytes("JPEG", (20, 10))
    result = service.upload(
        "my-style",
        [
            {"filename": "a.png", "content": b64(png), "caption": "  xyz_style, a red square \n"},
            UploadImage(filename="b.JPG", content=b64(jpeg), caption="xyz_style, a photo"),
            {"filename": "c.jpeg", "content": b64(jpeg)},  # no caption
        ],
    )
    assert isinstance(result, UploadResult)
    folder = tmp_path / "datasets" / "my-style"
    assert (result.dataset_name, result.path, result.saved, result.refused) == ("my-style", str(folder), 3, 0)
    assert all(isinstance(o, FileOutcome) and o.saved and o.reason is None for o in result.files)
    assert [(o.filename, o.width, o.height, o.captioned) for o in result.files] == [
        ("a.png", 16, 12, True),
        ("b.JPG", 20, 10, True),
        ("c.jpeg", 20, 10, False),
    ]
    assert files_under(folder) == {"a.png", "a.txt", "b.JPG", "b.txt", "c.jpeg"}
    assert (folder / "a.png").read_bytes() == png
    assert (folder / "b.JPG").read_bytes() == jpeg
    assert (folder / "a.txt").read_text(encoding="utf-8") == "xyz_style, a red square"
    assert (folder / "b.txt").read_text(encoding="utf-8") == "xyz_style, a photo"
    assert "create-training-config" in result.next_step and "dataset_path='my-style'" in result.next_step

    # The folder is a dataset the trainer reads, found by its name.
    assert locate_dataset("my-style", tmp_path / "datasets") == folder.resolve()
    index = scan_dataset(folder, trigger_word="xyz_style", trigger_words={})
    assert index.num_images == 3


def test_data_is_a_synonym_of_content(service, tmp_path):
    png = image_bytes()
    result = service.upload("d", [{"filename": "a.png", "data": b64(png), "caption": "cap"}])
    assert result.saved == 1
    assert (tmp_path / "datasets" / "d" / "a.png").read_bytes() == png


def test_data_url_prefix_and_wrapped_base64_are_accepted(service, tmp_path):
    png, webp = image_bytes("PNG"), image_bytes("WEBP")
    wrapped = "\n".join(b64(webp)[i : i + 76] for i in range(0, len(b64(webp)), 76))
    result = service.upload(
        "d",
        [
            {"filename": "a.png", "content": "data:image/png;base64," + b64(png)},
            {"filename": "b.webp", "content": wrapped},
        ],
    )
    assert result.saved == 2
    folder = tmp_path / "datasets" / "d"
    assert (folder / "a.png").read_bytes() == png
    assert (folder / "b.webp").read_bytes() == webp


# --- refusals ------------------------------------------------------------------------------------


def test_mixed_batch_saves_only_the_good_file(service, tmp_path):
    png = image_bytes("PNG")
    truncated = noisy_png()
    truncated = truncated[: len(truncated) // 2]
    items = [
        {"filename": "good.png", "content": b64(png), "caption": "good"},
        {"filename": "badb64.png", "content": "this is not base64!!", "caption": "x"},
        {"filename": "text.png", "content": b64(b"hello, I am not an image"), "caption": "x"},
        {"filename": "cut.png", "content": b64(truncated), "caption": "x"},
        {"filename": "../x.png", "content": b64(png), "caption": "x"},
        {"filename": "a/b/c.png", "content": b64(png), "caption": "x"},
        {"filename": ".hidden.png", "content": b64(png), "caption": "x"},
        {"filename": "notes.txt", "content": b64(b"some notes"), "caption": "x"},
        {"filename": "wrong.jpg", "content": b64(png), "caption": "x"},
    ]
    result = service.upload("mixed", items)
    assert (result.saved, result.refused) == (1, 8)
    assert [o.filename for o in result.files] == [i["filename"] for i in items]
    good, *bad = result.files
    assert good.saved and good.reason is None
    reasons = {o.filename: o.reason for o in bad}
    assert all(not o.saved and o.reason and o.width is None for o in bad)
    assert "base64" in reasons["badb64.png"]
    assert "not an image" in reasons["text.png"]
    assert "cannot be decoded" in reasons["cut.png"]
    assert "'..'" in reasons["../x.png"]
    assert "one folder level" in reasons["a/b/c.png"]  # one folder level is taken (10_cat/a.png)
    assert "hidden" in reasons[".hidden.png"]
    assert ".txt is not taken" in reasons["notes.txt"]
    assert "PNG" in reasons["wrong.jpg"] and "wrong.png" in reasons["wrong.jpg"]
    assert "refused" in result.next_step

    assert files_under(tmp_path) == {"datasets", "datasets/mixed", "datasets/mixed/good.png", "datasets/mixed/good.txt"}


def test_all_bad_batch_raises_naming_each_file_and_leaves_no_folder(service, tmp_path):
    png = image_bytes("PNG")
    items = [
        {"filename": "one.png", "content": "%%%"},
        {"filename": "two.jpg", "content": b64(png)},
        {"filename": "three.gif", "content": b64(png)},
        {"filename": "four.png"},
        {"content": b64(png)},  # no filename
    ]
    with pytest.raises(ServiceError) as info:
        service.upload("empty", items)
    message = str(info.value)
    for name in ["one.png", "two.jpg", "three.gif", "four.png", "images[4]"]:
        assert f"{name}:" in message
    assert not (tmp_path / "datasets" / "empty").exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_dataset_names_raise_and_write_nothing(service, tmp_path, name):
    with pytest.raises(ServiceError, match="dataset name"):
        service.upload(name, [{"filename": "a.png", "content": b64(image_bytes())}])
    assert list(tmp_path.rglob("*")) == []


def test_existing_file_is_refused_without_overwrite_and_replaced_with_it(service, tmp_path):
    first, second = image_bytes(color=(1, 2, 3)), image_bytes(color=(250, 250, 250), size=(8, 8))
    service.upload("d", [{"filename": "a.png", "content": b64(first), "caption": "old"}])
    folder = tmp_path / "datasets" / "d"

    with pytest.raises(ServiceError, match="overwrite=true"):
        service.upload("d", [{"filename": "a.png", "content": b64(second), "caption": "new"}])
    assert (folder / "a.png").read_bytes() == first
    assert (folder / "a.txt").read_text(encoding="utf-8") == "old"

    # In a batch with a new file, the existing one is refused and the new one saved.
    result = service.upload(
        "d",
        [{"filename": "a.png", "content": b64(second)}, {"filename": "b.png", "content": b64(second)}],
    )
    assert [(o.filename, o.saved) for o in result.files] == [("a.png", False), ("b.png", True)]
    assert "already" in result.files[0].reason

    result = service.upload("d", [{"filename": "a.png", "content": b64(second), "caption": "new"}], overwrite=True)
    assert result.saved == 1 and (result.files[0].width, result.files[0].height) == (8, 8)
    assert (folder / "a.png").read_bytes() == second
    assert (folder / "a.txt").read_text(encoding="utf-8") == "new"
    assert files_under(folder) == {"a.png", "a.txt", "b.png"}


def test_duplicate_filename_in_one_batch_keeps_the_first(service, tmp_path):
    first, second = image_bytes(color=(1, 2, 3)), image_bytes(color=(9, 9, 9))
    result = service.upload(
        "d",
        [
            {"filename": "a.png", "content": b64(first), "caption": "first"},
            {"filename": "a.png", "content": b64(second), "caption": "second"},
        ],
    )
    assert [(o.saved, o.reason is None) for o in result.files] == [(True, True), (False, False)]
    assert "earlier in this batch" in result.files[1].reason
    folder = tmp_path / "datasets" / "d"
    assert (folder / "a.png").read_bytes() == first
    assert (folder / "a.txt").read_text(encoding="utf-8") == "first"


def test_images_sharing_a_caption_file_are_refused(service, tmp_path):
    png, jpeg = image_bytes("PNG"), image_bytes("JPEG")
    result = service.upload(
        "d", [{"filename": "a.png", "content": b64(png)}, {"filename": "a.jpg", "content": b64(jpeg)}]
    )
    assert [o.saved for o in result.files] == [True, False]
    assert "a.txt" in result.files[1].reason
    with pytest.raises(ServiceError, match="a.txt"):
        service.upload("d", [{"filename": "a.webp", "content": b64(image_bytes("WEBP"))}], overwrite=True)
    assert files_under(tmp_path / "datasets" / "d") == {"a.png"}


def test_content_and_data_must_agree_and_one_is_needed(service):
    png = image_bytes()
    with pytest.raises(ServiceError) as info:
        service.upload(
            "d",
            [
                {"filename": "a.png", "content": b64(png), "data": b64(image_bytes(color=(0, 0, 0)))},
                {"filename": "b.png", "caption": "no bytes"},
                {"filename": "c.png", "content": ""},
            ],
        )
    message = str(info.value)
    assert "a.png: both content and data" in message
    assert "b.png: no image bytes" in message
    assert "c.png: content is empty" in message
    result = service.upload("d", [{"filename": "a.png", "content": b64(png), "data": b64(png)}])
    assert result.saved == 1


def test_batch_and_size_limits(service, tmp_path, monkeypatch):
    png = b64(image_bytes())
    too_many = [{"filename": f"i{i}.png", "content": png} for i in range(MAX_IMAGES_PER_CALL + 1)]
    with pytest.raises(ServiceError, match=f"limit is {MAX_IMAGES_PER_CALL}"):
        service.upload("d", too_many)
    assert not (tmp_path / "datasets").exists()

    monkeypatch.setattr("server.image_checks.MAX_IMAGE_BYTES", 1000)
    small, big = image_bytes(), noisy_png()
    assert len(small) < 1000 < len(big)
    result = service.upload(
        "d", [{"filename": "small.png", "content": b64(small)}, {"filename": "big.png", "content": b64(big)}]
    )
    assert [o.saved for o in result.files] == [True, False]
    assert re.search(r"the image is [0-9.]+ MB; the limit is", result.files[1].reason)
    assert files_under(tmp_path / "datasets" / "d") == {"small.png"}


def test_images_must_be_a_non_empty_list(service):
    with pytest.raises(ServiceError, match="at least one"):
        service.upload("d", [])
    with pytest.raises(ServiceError, match="must be a list"):
        service.upload("d", {"filename": "a.png"})  # type: ignore[arg-type]


# --- list ----------------------------------------------------------------------------------------


def test_list_counts_images_captions_and_size(service, tmp_path):
    assert service.list() == []
    png, jpeg = image_bytes("PNG"), image_bytes("JPEG")
    service.upload(
        "beta",
        [
            {"filename": "a.png", "content": b64(png), "caption": "one"},
            {"filename": "b.jpg", "content": b64(jpeg), "caption": "two"},
            {"filename": "c.png", "content": b64(png)},
        ],
    )
    service.upload("alpha", [{"filename": "x.webp", "content": b64(image_bytes("WEBP"))}])
    beta = tmp_path / "datasets" / "beta"
    concept = beta / "10_xyz_cat"
    concept.mkdir()
    (concept / "d.png").write_bytes(png)
    (concept / "d.txt").write_text("three", encoding="utf-8")
    (beta / "notes.md").write_text("not an image", encoding="utf-8")
    (beta / ".cache").mkdir()
    (beta / ".cache" / "e.png").write_bytes(png)  # hidden: not counted
    (tmp_path / "datasets" / ".tmp-upload").mkdir()  # hidden folder: not a dataset
    (tmp_path / "datasets" / "stray.png").write_bytes(png)  # a file: not a dataset

    summaries = service.list()
    assert all(isinstance(s, DatasetSummary) for s in summaries)
    assert [s.name for s in summaries] == ["alpha", "beta"]
    alpha, beta_summary = summaries
    assert (alpha.images, alpha.captioned) == (1, 0)
    assert (beta_summary.images, beta_summary.captioned) == (4, 3)
    assert beta_summary.path == str(beta)
    expected = sum(
        p.stat().st_size for p in beta.rglob("*") if p.is_file() and ".cache" not in p.relative_to(beta).parts
    )
    assert beta_summary.size_bytes == expected


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    """Pillow's pixel limit, lowered here so that a small file stands for a bomb."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 pixels: over the limit, under twice it
    bomb = {"filename": "bomb.png", "content": base64.b64encode(buffer.getvalue()).decode()}
    with pytest.raises(ServiceError, match="too many pixels"):
        DatasetService(tmp_path).upload("bombs", [bomb])
    assert not (tmp_path / "datasets" / "bombs").exists()


def test_a_dataset_size_limit_refuses_what_would_pass_it(tmp_path, monkeypatch):
    import server.image_checks

    def png(seed: int) -> str:
        buffer = io.BytesIO()
        Image.effect_noise((64, 64), 50 + seed).convert("RGB").save(buffer, format="PNG")  # ~12 KB, incompressible
        return base64.b64encode(buffer.getvalue()).decode()

    monkeypatch.setattr(server.image_checks, "MAX_DATASET_BYTES", 20_000)
    result = DatasetService(tmp_path).upload(
        "capped", [{"filename": "a.png", "content": png(1)}, {"filename": "b.png", "content": png(2)}]
    )
    assert [f.saved for f in result.files] == [True, False]
    assert "size limit" in result.files[1].reason and "LORA_MCP_MAX_DATASET_MB" in result.files[1].reason
    assert sorted(p.name for p in (tmp_path / "datasets" / "capped").iterdir()) == ["a.png"]


def test_limits_come_from_the_environment(monkeypatch):
    from server.limits import megabytes

    assert megabytes("LORA_MCP_TEST_LIMIT", 50) == 50 * 2**20
    monkeypatch.setenv("LORA_MCP_TEST_LIMIT", "1.5")
    assert megabytes("LORA_MCP_TEST_LIMIT", 50) == int(1.5 * 2**20)
    for bad in ("-1", "zero", "0"):
        monkeypatch.setenv("LORA_MCP_TEST_LIMIT", bad)
        with pytest.raises(ValueError, match="positive number of megabytes"):
            megabytes("LORA_MCP_TEST_LIMIT", 50)


def test_a_zip_entry_the_file_system_refuses_is_refused_alone(tmp_path):
    """A workspace deep enough that one entry's full path passes Linux's 4096-byte limit: the OSError of that
    entry refuses it, the others are saved, and the new dataset takes its name."""
    import zipfile

    workspace = tmp_path
    while len(str(workspace)) < 3900:
        workspace = workspace / ("w" * 100)
    workspace.mkdir(parents=True)
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("ok.png", noisy_png())
        zipped.writestr("n" * 200 + ".png", noisy_png())
    result = DatasetService(workspace).upload_zip("deep", archive)
    files = {f.filename: f for f in result.files}
    assert files["ok.png"].saved
    assert not files["n" * 200 + ".png"].saved and "could not be saved" in files["n" * 200 + ".png"].reason
    assert sorted(p.name for p in (workspace / "datasets").iterdir()) == ["deep"]
    assert sorted(p.name for p in (workspace / "datasets" / "deep").iterdir()) == ["ok.png"]
