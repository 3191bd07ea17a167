"""Reading a dataset folder: captions, trigger words, kohya repeat folders, held-out images,
corrupt files, locating a dataset by name, tag frequencies and class-image records."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from training.data.dataset import (
    DatasetError,
    class_image_records,
    locate_dataset,
    scan_dataset,
    with_trigger_first,
)


def write_image(path: Path, caption: str | None = None, size: tuple[int, int] = (64, 64), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def scan(root: Path, trigger_word: str | None = None, trigger_words: dict[str, str] | None = None, **kw):
    return scan_dataset(root, trigger_word=trigger_word, trigger_words=trigger_words or {}, **kw)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def captions_by_file(index) -> dict[str, str]:
    return {r.path.name: r.caption for r in index.images}


# --- a flat folder ----------------------------------------------------------------------------


def test_flat_folder_keeps_captions_and_puts_the_trigger_first_where_missing(tmp_path):
    write_image(tmp_path / "a.png", "a red circle, flat colours")
    write_image(tmp_path / "b.png", "a photo of XYZ_Shape, blue")  # present, other case, not first
    write_image(tmp_path / "c.png", "blue square, xyz_shape")  # present, last
    write_image(tmp_path / "d.png", "xyz_shapes everywhere")  # a longer word is not the trigger
    index = scan(tmp_path, trigger_word="xyz_shape")

    assert index.num_images == 4
    assert index.num_samples == 4
    assert captions_by_file(index) == {
        "a.png": "xyz_shape a red circle, flat colours",
        "b.png": "a photo of XYZ_Shape, blue",
        "c.png": "blue square, xyz_shape",
        "d.png": "xyz_shape xyz_shapes everywhere",
    }
    assert len(index.concepts) == 1
    root = index.concepts[0]
    assert (root.name, root.folder, root.trigger_word, root.repeats, root.num_images) == ("", "", "xyz_shape", 1, 4)
    assert all(r.concept == "" and r.repeats == 1 and r.loss_weight == 1.0 for r in index.images)
    assert index.validation == [] and index.warnings == []
    assert index.root == tmp_path.resolve()


def test_generated_shapes_keep_their_captions(shapes):
    index = scan(shapes, trigger_word="xyz_shape")
    assert index.num_images == 4
    for record in index.images:
        written = record.path.with_suffix(".txt").read_text(encoding="utf-8")
        assert record.caption == written
        assert record.caption.startswith("xyz_shape ")
        assert record.size == (64, 64)


def test_records_hold_the_image_size_and_one_line_captions(tmp_path):
    write_image(tmp_path / "wide.png", "line one\nline two\n\n", size=(96, 48))
    write_image(tmp_path / "UPPER.PNG", "upper case suffix", size=(40, 80))
    index = scan(tmp_path)
    by_name = {r.path.name: r for r in index.images}
    assert set(by_name) == {"wide.png", "UPPER.PNG"}
    assert by_name["wide.png"].size == (96, 48)
    assert by_name["UPPER.PNG"].size == (40, 80)
    assert by_name["wide.png"].caption == "line one line two"  # no trigger word given: caption as is


def test_with_trigger_first():
    assert with_trigger_first("a cat", "xyz") == "xyz a cat"
    assert with_trigger_first("a XYZ cat", "xyz") == "a XYZ cat"
    assert with_trigger_first("", "xyz") == "xyz"
    assert with_trigger_first("a cat", None) == "a cat"
    assert with_trigger_first("my_xyz cat", "xyz") == "xyz my_xyz cat"


# --- kohya repeat folders -------------------------------------------------------------------------


def make_cat_dog(root: Path) -> None:
    for i in range(2):
        write_image(root / "10_xyz_cat" / f"cat{i}.png", f"a cat number {i}")
    for i in range(3):
        write_image(root / "xyz_dog" / f"dog{i}.png", f"a dog number {i}")


def test_repeat_folders_become_concepts(tmp_path):
    make_cat_dog(tmp_path)
    index = scan(tmp_path, trigger_word="ignored_word")
    concepts = {c.name: c for c in index.concepts}
    assert set(concepts) == {"xyz_cat", "xyz_dog"}
    assert (concepts["xyz_cat"].repeats, concepts["xyz_cat"].folder, concepts["xyz_cat"].num_images) == (
        10,
        "10_xyz_cat",
        2,
    )
    assert (concepts["xyz_dog"].repeats, concepts["xyz_dog"].folder, concepts["xyz_dog"].num_images) == (
        1,
        "xyz_dog",
        3,
    )
    assert concepts["xyz_cat"].trigger_word == "xyz_cat"
    assert concepts["xyz_dog"].trigger_word == "xyz_dog"
    assert index.num_images == 5
    assert index.num_samples == 2 * 10 + 3
    for record in index.images:
        assert record.caption.startswith(record.concept + " ")
        assert record.repeats == concepts[record.concept].repeats


def test_trigger_words_override_folder_names(tmp_path):
    make_cat_dog(tmp_path)
    index = scan(tmp_path, trigger_word="ignored_word", trigger_words={"xyz_dog": "sks_dog", "10_xyz_cat": "sks_cat"})
    concepts = {c.name: c for c in index.concepts}
    assert concepts["xyz_dog"].trigger_word == "sks_dog"
    assert concepts["xyz_cat"].trigger_word == "sks_cat"
    captions = captions_by_file(index)
    assert captions["dog0.png"] == "sks_dog a dog number 0"
    assert captions["cat1.png"] == "sks_cat a cat number 1"
    assert index.warnings == []


def test_trigger_words_for_missing_folders_warn(tmp_path):
    make_cat_dog(tmp_path)
    index = scan(tmp_path, trigger_words={"xyz_bird": "sks_bird"})
    assert any("xyz_bird" in w for w in index.warnings)


def test_single_concept_folder_uses_trigger_word(tmp_path):
    for i in range(2):
        write_image(tmp_path / "5_my_char" / f"c{i}.png", "standing")
    index = scan(tmp_path, trigger_word="xyz_char")
    assert len(index.concepts) == 1
    concept = index.concepts[0]
    assert (concept.name, concept.trigger_word, concept.repeats) == ("my_char", "xyz_char", 5)
    assert all(r.caption == "xyz_char standing" for r in index.images)
    assert index.num_samples == 10


def test_single_concept_folder_without_trigger_word_uses_its_name(tmp_path):
    write_image(tmp_path / "5_my_char" / "c.png", "standing")
    index = scan(tmp_path)
    assert index.concepts[0].trigger_word == "my_char"
    assert index.images[0].caption == "my_char standing"


def test_a_folder_without_images_does_not_change_the_trigger_word(tmp_path):
    write_image(tmp_path / "5_my_char" / "c.png", "standing")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.md").write_text("retake photos", encoding="utf-8")
    index = scan(tmp_path, trigger_word="xyz_char")
    assert index.images[0].caption == "xyz_char standing"


def test_nested_images_in_a_concept_folder_are_found(tmp_path):
    write_image(tmp_path / "3_cat" / "sub" / "deep.png", "deep cat")
    write_image(tmp_path / "3_cat" / "top.png", "top cat")
    index = scan(tmp_path)
    assert sorted(r.path.name for r in index.images) == ["deep.png", "top.png"]
    assert all(r.concept == "cat" and r.repeats == 3 for r in index.images)


def test_repeat_count_zero_is_rejected(tmp_path):
    write_image(tmp_path / "0_cat" / "a.png", "cat")
    with pytest.raises(DatasetError, match="0_cat"):
        scan(tmp_path)


# --- held-out validation images ---------------------------------------------------------------------


def test_validation_folder_is_held_out(tmp_path):
    write_image(tmp_path / "a.png", "train one")
    write_image(tmp_path / "b.png", "train two")
    write_image(tmp_path / "validation" / "v1.png", "held out one")
    write_image(tmp_path / "validation" / "v2.png", "held out two")
    index = scan(tmp_path, trigger_word="xyz")

    train_paths = {r.path for r in index.images}
    val_paths = {r.path for r in index.validation}
    assert {p.name for p in val_paths} == {"v1.png", "v2.png"}
    assert {p.name for p in train_paths} == {"a.png", "b.png"}
    assert not train_paths & val_paths
    assert all("validation" not in r.path.parts for r in index.images)
    assert index.num_images == 2
    assert all(c.folder != "validation" for c in index.concepts)
    assert {r.caption for r in index.validation} == {"xyz held out one", "xyz held out two"}


def test_only_validation_images_is_no_training_data(tmp_path):
    write_image(tmp_path / "validation" / "v.png", "held out")
    with pytest.raises(DatasetError, match="no training images"):
        scan(tmp_path)


# --- missing captions ---------------------------------------------------------------------------------


def test_uncaptioned_image_uses_instance_prompt_and_warns(tmp_path):
    write_image(tmp_path / "captioned.png", "xyz_person smiling")
    write_image(tmp_path / "bare.png")  # no .txt
    write_image(tmp_path / "blank.png", "   \n")  # an empty .txt counts as none
    index = scan(tmp_path, trigger_word="xyz_person", instance_prompt="a photo of xyz_person person")
    captions = captions_by_file(index)
    assert captions["bare.png"] == "a photo of xyz_person person"
    assert captions["blank.png"] == "a photo of xyz_person person"
    assert captions["captioned.png"] == "xyz_person smiling"
    assert len(index.warnings) == 1
    warning = index.warnings[0]
    assert "bare.png" in warning and "blank.png" in warning and "captioned.png" not in warning
    assert "instance_prompt" in warning


def test_uncaptioned_image_without_instance_prompt_uses_the_trigger_word(tmp_path):
    write_image(tmp_path / "bare.png")
    index = scan(tmp_path, trigger_word="xyz_thing")
    assert index.images[0].caption == "xyz_thing"
    assert any("bare.png" in w and "trigger word" in w for w in index.warnings)


def test_instance_prompt_without_the_trigger_gets_it_first(tmp_path):
    write_image(tmp_path / "bare.png")
    index = scan(tmp_path, trigger_word="xyz_thing", instance_prompt="a thing")
    assert index.images[0].caption == "xyz_thing a thing"


def test_uncaptioned_warning_names_the_file_in_its_concept_folder(tmp_path):
    write_image(tmp_path / "2_cat" / "nocap.png")
    write_image(tmp_path / "dog" / "d.png", "dog")
    index = scan(tmp_path)
    assert index.images[0].caption == "cat"
    assert any(str(Path("2_cat") / "nocap.png") in w for w in index.warnings)


# --- corrupt images -------------------------------------------------------------------------------------


def test_every_corrupt_image_is_listed_and_nothing_is_written(tmp_path):
    write_image(tmp_path / "good.png", "fine")
    (tmp_path / "garbage.png").write_bytes(b"this is not a png file at all " * 20)
    buffer = io.BytesIO()
    Image.effect_noise((128, 128), 60).convert("RGB").save(buffer, "PNG")
    data = buffer.getvalue()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    write_image(tmp_path / "3_cat" / "cat_ok.png", "cat")
    (tmp_path / "3_cat" / "cat_bad.jpeg").write_bytes(b"\xff\xd8\xff garbage")
    before = snapshot(tmp_path)

    with pytest.raises(DatasetError) as info:
        scan(tmp_path, trigger_word="xyz")
    msg = str(info.value)
    for name in ("garbage.png", "truncated.png", "empty.jpg", "cat_bad.jpeg"):
        assert name in msg, f"{name} missing from {msg!r}"
    assert "good.png" not in msg and "cat_ok.png" not in msg
    assert msg.startswith("4 image(s)")
    assert snapshot(tmp_path) == before


def test_corrupt_validation_image_is_reported(tmp_path):
    write_image(tmp_path / "good.png", "fine")
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "bad.png").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="bad.png"):
        scan(tmp_path)


# --- no images -----------------------------------------------------------------------------------------


def test_empty_folder_has_no_training_images(tmp_path):
    with pytest.raises(DatasetError, match="no training images"):
        scan(tmp_path)


def test_folder_with_only_captions_has_no_training_images(tmp_path):
    (tmp_path / "a.txt").write_text("a cat", encoding="utf-8")
    (tmp_path / "b.txt").write_text("a dog", encoding="utf-8")
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "c.txt").write_text("a cat", encoding="utf-8")
    with pytest.raises(DatasetError, match="no training images"):
        scan(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan(tmp_path / "nowhere")


def test_a_file_is_not_a_dataset_folder(tmp_path):
    image = write_image(tmp_path / "one.png", "x")
    with pytest.raises(DatasetError, match="not a folder"):
        scan(image)


# --- ignored files -------------------------------------------------------------------------------------


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    write_image(tmp_path / "real.png", "real")
    write_image(tmp_path / ".hidden.png", "hidden")
    (tmp_path / "._real.png").write_bytes(b"macOS resource fork, not an image")  # would be corrupt if read
    write_image(tmp_path / ".cache" / "cached.png", "cached")
    write_image(tmp_path / "2_cat" / "cat.png", "cat")
    write_image(tmp_path / "2_cat" / ".thumbs" / "thumb.png", "thumb")
    (tmp_path / "2_cat" / ".DS_Store").write_bytes(b"\x00\x01garbage")
    (tmp_path / "notes.md").write_text("# notes", encoding="utf-8")
    (tmp_path / "2_cat" / "source.psd").write_bytes(b"8BPS not read")

    index = scan(tmp_path)
    assert sorted(r.path.name for r in index.images) == ["cat.png", "real.png"]
    assert {c.folder for c in index.concepts} == {"", "2_cat"}
    assert index.num_samples == 1 + 2


# --- locate_dataset ------------------------------------------------------------------------------------


def test_locate_existing_path(tmp_path, monkeypatch):
    folder = tmp_path / "sets" / "mine"
    folder.mkdir(parents=True)
    assert locate_dataset(str(folder), tmp_path / "datasets") == folder.resolve()
    monkeypatch.chdir(tmp_path)
    found = locate_dataset("sets/../sets/mine", tmp_path / "datasets")
    assert found == folder.resolve() and found.is_absolute() and ".." not in found.parts


def test_locate_by_name_under_datasets_root(tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    (root / "cats").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # no ./cats here
    assert locate_dataset("cats", root) == (root / "cats").resolve()


@pytest.mark.parametrize("name", ["../outside", "../datasets/cats", "missing", "cats/inner"])
def test_locate_rejects_escapes_and_missing_names(tmp_path, monkeypatch, name):
    root = tmp_path / "ws" / "datasets"
    root.mkdir(parents=True)
    (tmp_path / "ws" / "outside").mkdir()  # what '../outside' would reach from the datasets root
    (root / "cats" / "inner").mkdir(parents=True)
    cwd = tmp_path / "elsewhere" / "deeper"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)  # relative to here none of the names exist
    with pytest.raises(DatasetError) as info:
        locate_dataset(name, root)
    assert repr(name) in str(info.value)


def test_locate_rejects_an_empty_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError):
        locate_dataset("", tmp_path / "datasets")


# --- tag frequency ----------------------------------------------------------------------------------------


def test_tag_frequency_counts_tags_per_concept_folder(tmp_path):
    write_image(tmp_path / "10_xyz_cat" / "c1.png", "xyz_cat, orange, fluffy")
    write_image(tmp_path / "10_xyz_cat" / "c2.png", "xyz_cat, black, fluffy,  ")
    write_image(tmp_path / "xyz_dog" / "d1.png", "xyz_dog, brown")
    write_image(tmp_path / "root.png", "xyz_pet, fluffy")
    index = scan(tmp_path, trigger_word="xyz_pet")
    assert index.tag_frequency() == {
        "10_xyz_cat": {"xyz_cat": 2, "orange": 1, "black": 1, "fluffy": 2},
        "xyz_dog": {"xyz_dog": 1, "brown": 1},
        ".": {"xyz_pet": 1, "fluffy": 1},
    }


def test_tag_frequency_keeps_folders_with_the_same_concept_name_apart(tmp_path):
    write_image(tmp_path / "10_cat" / "a.png", "cat, indoor")
    write_image(tmp_path / "2_cat" / "b.png", "cat, outdoor")
    freq = scan(tmp_path).tag_frequency()
    assert freq == {"10_cat": {"cat": 1, "indoor": 1}, "2_cat": {"cat": 1, "outdoor": 1}}


# --- class images --------------------------------------------------------------------------------------------


def test_class_image_records(tmp_path):
    paths = [write_image(tmp_path / "class" / f"p{i}.png", size=(64 + 16 * i, 64)) for i in range(3)]
    records = class_image_records(paths, "a photo of a person", repeats=4, loss_weight=0.5)
    assert [r.path for r in records] == paths
    assert [r.size for r in records] == [(64, 64), (80, 64), (96, 64)]
    for record in records:
        assert record.concept == "class"
        assert record.caption == "a photo of a person"
        assert record.repeats == 4
        assert record.loss_weight == 0.5


def test_broken_class_image_is_named(tmp_path):
    good = write_image(tmp_path / "class" / "ok.png")
    bad = tmp_path / "class" / "broken.png"
    bad.write_bytes(b"xx")
    with pytest.raises(DatasetError, match="broken.png"):
        class_image_records([good, bad], "person", repeats=1, loss_weight=1.0)


def test_a_photo_turned_by_its_exif_orientation_has_its_displayed_size(tmp_path):
    from PIL import Image

    image = Image.new("RGB", (96, 64), (10, 200, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # stored landscape, shown portrait (a phone held upright)
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    (tmp_path / "phone.txt").write_text("xyz_shape a photo")
    index = scan_dataset(tmp_path, trigger_word="xyz_shape", trigger_words={})
    assert index.images[0].size == (64, 96)  # as load_pixels sees it after exif_transpose
