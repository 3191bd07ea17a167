"""DatasetService: importing a folder from the server's disk, deleting a dataset, updating captions."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from PIL import Image

from server.datasets import CaptionUpdateResult, DatasetService, ImportResult
from server.errors import ServiceError
from training.data.dataset import scan_dataset


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (16, 12), color=(200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3)).save(buffer, format="PNG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


def put(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir() or p.is_symlink()}


GOOD = {
    "root.png": image_bytes("PNG", color=(1, 2, 3)),
    "10_xyz_cat/a.png": image_bytes("PNG", color=(4, 5, 6)),
    "10_xyz_cat/b.jpg": image_bytes("JPEG", (20, 10)),
    "xyz_dog/c.webp": image_bytes("WEBP"),
    "xyz_dog/more/d.png": image_bytes("PNG", (8, 8)),
    "validation/v.png": image_bytes("PNG", color=(7, 8, 9)),
}
CAPTIONS = {
    "root.txt": "xyz_thing, on a table",
    "10_xyz_cat/a.txt": "xyz_cat, sleeping",
    "10_xyz_cat/b.txt": "xyz_cat, jumping",
    "validation/v.txt": "xyz_thing, held out",
}


@pytest.fixture
def workspace(tmp_path) -> Path:
    folder = tmp_path / "ws"
    folder.mkdir()
    return folder


@pytest.fixture
def service(workspace) -> DatasetService:
    return DatasetService(workspace)


@pytest.fixture
def photos(tmp_path, monkeypatch) -> Path:
    """A kohya-style folder outside the workspace, allowed through LORA_MCP_ALLOWED_DIRS."""
    source = tmp_path / "photos"
    for rel, data in {**GOOD, **CAPTIONS}.items():
        put(source / rel, data)
    put(source / "notes.md", "# shoot notes")
    put(source / ".hidden.png", GOOD["root.png"])
    put(source / ".cache" / "x.png", GOOD["root.png"])
    put(source / "10_xyz_cat" / "corrupt.png", truncated_png())
    put(source / "10_xyz_cat" / "corrupt.txt", "caption of a broken image")
    put(source / "xyz_dog" / "page.jpg", "<html><body>not an image</body></html>")
    put(source / "orphan.txt", "a caption without its image")
    monkeypatch.setenv("LORA_MCP_ALLOWED_DIRS", str(source))
    return source


def test_import_copies_the_kohya_layout_and_reports_refusals(service, workspace, photos):
    result = service.import_folder("pets", str(photos))
    assert isinstance(result, ImportResult)
    dataset = workspace / "datasets" / "pets"
    assert (result.dataset_name, result.path, result.mode, result.source) == ("pets", str(dataset), "copy", str(photos))
    assert (result.imported, result.refused) == (6, 4)

    assert files_under(dataset) == set(GOOD) | set(CAPTIONS)
    assert not any(p.is_symlink() for p in dataset.rglob("*"))
    for rel, data in GOOD.items():
        assert (dataset / rel).read_bytes() == data
    for rel, text in CAPTIONS.items():
        assert (dataset / rel).read_text(encoding="utf-8") == text

    outcomes = {o.filename: o for o in result.files}
    assert set(outcomes) == set(GOOD) | {"notes.md", "orphan.txt", "10_xyz_cat/corrupt.png", "xyz_dog/page.jpg"}
    assert all(outcomes[rel].saved and outcomes[rel].reason is None for rel in GOOD)
    assert (outcomes["10_xyz_cat/b.jpg"].width, outcomes["10_xyz_cat/b.jpg"].height) == (20, 10)
    assert outcomes["10_xyz_cat/a.png"].captioned and not outcomes["xyz_dog/c.webp"].captioned
    assert "cannot be decoded" in outcomes["10_xyz_cat/corrupt.png"].reason
    assert "caption was not imported" in outcomes["10_xyz_cat/corrupt.png"].reason
    assert "not an image Pillow can read" in outcomes["xyz_dog/page.jpg"].reason
    assert "not an image" in outcomes["notes.md"].reason
    assert "without a same-named image" in outcomes["orphan.txt"].reason
    assert "dataset_path='pets'" in result.next_step and "4 file(s)" in result.next_step

    # The concepts reported are the ones the trainer finds.
    assert [(c.folder, c.name, c.repeats, c.images) for c in result.concepts] == [
        ("", "", 1, 1),
        ("10_xyz_cat", "xyz_cat", 10, 2),
        ("xyz_dog", "xyz_dog", 1, 2),
    ]
    assert result.validation_images == 1
    index = scan_dataset(dataset, trigger_word="xyz_thing", trigger_words={})
    assert [(c.folder, c.repeats, c.num_images) for c in index.concepts] == [
        (c.folder, c.repeats, c.images) for c in result.concepts
    ]
    assert len(index.validation) == 1


def test_link_mode_links_and_delete_leaves_the_sources(service, workspace, photos):
    before = {rel: (photos / rel).read_bytes() for rel in [*GOOD, *CAPTIONS]}
    result = service.import_folder("linked", str(photos), mode="link")
    assert (result.mode, result.imported) == ("link", 6)
    dataset = workspace / "datasets" / "linked"
    for rel in [*GOOD, *CAPTIONS]:
        link = dataset / rel
        assert link.is_symlink() and Path(link.readlink()) == (photos / rel).resolve()
    assert not (dataset / "10_xyz_cat").is_symlink()  # folders are real, only files link
    assert "delete-dataset removes only the links" in result.next_step

    # A caption edit replaces the link with the dataset's own file; the source caption stays.
    service.update_captions("linked", edits={"root.png": "xyz_thing, edited"})
    assert not (dataset / "root.txt").is_symlink()
    assert (dataset / "root.txt").read_text(encoding="utf-8") == "xyz_thing, edited"
    assert (photos / "root.txt").read_text(encoding="utf-8") == CAPTIONS["root.txt"]

    assert service.delete("linked") is None
    assert not dataset.exists()
    assert {rel: (photos / rel).read_bytes() for rel in before} == before


def test_source_outside_the_allowed_folders_is_refused(service, workspace, tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_MCP_ALLOWED_DIRS", raising=False)
    source = tmp_path / "elsewhere"
    put(source / "a.png", image_bytes())
    with pytest.raises(ServiceError, match="LORA_MCP_ALLOWED_DIRS"):
        service.import_folder("d", str(source))
    # A link inside the workspace to the outside folder resolves outside, too.
    (workspace / "shortcut").symlink_to(source, target_is_directory=True)
    with pytest.raises(ServiceError, match="LORA_MCP_ALLOWED_DIRS"):
        service.import_folder("d", "shortcut")
    assert not (workspace / "datasets").exists()

    with pytest.raises(ServiceError, match="does not exist"):
        service.import_folder("d", str(workspace / "nope"))
    with pytest.raises(ServiceError, match="dataset name"):
        service.import_folder("../d", str(source))


def test_links_leading_outside_are_refused_per_file(service, workspace, photos, tmp_path):
    secret = tmp_path / "secret"
    put(secret / "s.png", image_bytes())
    (photos / "evil.png").symlink_to(secret / "s.png")
    (photos / "evil_dir").symlink_to(secret, target_is_directory=True)
    (photos / "alias.png").symlink_to(photos / "10_xyz_cat" / "a.png")  # inside the allowed folder: fine

    result = service.import_folder("d", str(photos))
    outcomes = {o.filename: o for o in result.files}
    for rel in ["evil.png", "evil_dir"]:
        assert not outcomes[rel].saved and "outside the folders" in outcomes[rel].reason
    assert outcomes["alias.png"].saved
    dataset = workspace / "datasets" / "d"
    assert not (dataset / "evil.png").exists() and not (dataset / "evil_dir").exists()
    assert (dataset / "alias.png").read_bytes() == GOOD["10_xyz_cat/a.png"]


def test_existing_dataset_needs_overwrite(service, workspace, photos):
    service.import_folder("d", str(photos))
    dataset = workspace / "datasets" / "d"
    put(dataset / "extra.png", image_bytes())
    put(photos / "root.txt", "xyz_thing, a new caption")

    with pytest.raises(ServiceError, match="overwrite=true"):
        service.import_folder("d", str(photos))
    assert (dataset / "root.txt").read_text(encoding="utf-8") == CAPTIONS["root.txt"]

    result = service.import_folder("d", str(photos), overwrite=True)
    assert result.imported == 6
    assert (dataset / "root.txt").read_text(encoding="utf-8") == "xyz_thing, a new caption"
    assert (dataset / "extra.png").is_file()  # files the source does not have are kept


def test_nothing_importable_raises_and_leaves_no_dataset(service, workspace, tmp_path, monkeypatch):
    source = tmp_path / "junk"
    put(source / "notes.md", "notes")
    put(source / "sub" / "broken.png", truncated_png())
    monkeypatch.setenv("LORA_MCP_ALLOWED_DIRS", str(source))
    with pytest.raises(ServiceError) as info:
        service.import_folder("d", str(source))
    assert "notes.md:" in str(info.value) and "sub/broken.png:" in str(info.value)
    assert not (workspace / "datasets" / "d").exists()


# --- captions ------------------------------------------------------------------------------------


@pytest.fixture
def captioned(workspace) -> Path:
    dataset = workspace / "datasets" / "d"
    put(dataset / "img1.png", image_bytes())
    put(dataset / "img1.txt", "a cat, red")
    put(dataset / "10_cat" / "img2.png", image_bytes())
    put(dataset / "10_cat" / "img2.txt", "xyz, a cat, blue")
    put(dataset / "img3.jpg", image_bytes("JPEG"))  # no caption
    return dataset


def caption(dataset: Path, rel: str) -> str | None:
    path = dataset / rel
    return path.read_text(encoding="utf-8") if path.exists() else None


def test_edits_write_captions_and_refuse_bad_keys(service, captioned):
    long = "word " * 100
    result = service.update_captions(
        "d",
        edits={
            "img1.png": "  a dog  ",
            "10_cat/img2.png": "xyz, a cat, blue",  # as it is already
            "img3.jpg": long,
            "../x.png": "escape",
            "missing.png": "nothing there",
            "/etc/passwd": "absolute",
            "img1.txt": "the caption file",
        },
    )
    assert isinstance(result, CaptionUpdateResult)
    assert (result.changed, result.unchanged, result.refused) == (2, 1, 4)
    assert caption(captioned, "img1.txt") == "a dog"
    assert caption(captioned, "img3.txt") == long.strip()
    outcomes = {o.filename: o for o in result.files}
    assert outcomes["img1.png"].changed and outcomes["img1.png"].caption == "a dog"
    assert not outcomes["10_cat/img2.png"].changed
    assert len(outcomes["img3.jpg"].caption) == 200 and outcomes["img3.jpg"].caption.endswith("...")
    assert "'..'" in outcomes["../x.png"].reason
    assert "not an image of this dataset" in outcomes["missing.png"].reason
    assert "absolute" in outcomes["/etc/passwd"].reason
    assert "'img1.png'" in outcomes["img1.txt"].reason
    assert not (captioned.parent / "x.txt").exists()


def test_find_replace_changes_existing_captions_only(service, captioned):
    result = service.update_captions("d", find="cat", replace="dog")
    assert (result.changed, result.unchanged, result.refused) == (2, 1, 0)
    assert caption(captioned, "img1.txt") == "a dog, red"
    assert caption(captioned, "10_cat/img2.txt") == "xyz, a dog, blue"
    assert caption(captioned, "img3.txt") is None
    result = service.update_captions("d", find="zebra", replace="horse")
    assert result.changed == 0 and "matched no caption" in result.next_step


def test_trigger_word_is_put_first_where_missing(service, captioned):
    result = service.update_captions("d", trigger_word="xyz")
    assert (result.changed, result.unchanged) == (2, 1)
    assert caption(captioned, "img1.txt") == "xyz a cat, red"
    assert caption(captioned, "10_cat/img2.txt") == "xyz, a cat, blue"
    assert caption(captioned, "img3.txt") == "xyz"  # no caption: the trigger word alone


def test_update_captions_needs_something_to_do(service, captioned):
    with pytest.raises(ServiceError, match="nothing to do"):
        service.update_captions("d")
    with pytest.raises(ServiceError, match="nothing to do"):
        service.update_captions("d", edits={})
    with pytest.raises(ServiceError, match="go together"):
        service.update_captions("d", find="cat")
    with pytest.raises(ServiceError, match="list-datasets"):
        service.update_captions("unknown", trigger_word="xyz")


def test_delete(service, captioned):
    with pytest.raises(ServiceError, match="list-datasets"):
        service.delete("unknown")
    with pytest.raises(ServiceError, match="dataset name"):
        service.delete("..")
    service.delete("d")
    assert not captioned.exists()
    assert service.list() == []
