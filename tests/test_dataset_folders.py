"""Datasets with folders (issue 15 item 3): upload-dataset takes a filename with one folder level
(`10_cat/a.png`, `validation/b.png`, `class/c.png`), and a concept folder's name becomes its trigger only
when its captions carry none of their own. Through the real stdio MCP client, then the trainer's reader."""

from __future__ import annotations

import base64

from test_mcp_server import run_session, server_workspace  # noqa: F401  (a fixture)

from training.data.dataset import scan_dataset
from training.data.synthetic import make_shape_dataset


def _png(shapes, number: int) -> str:
    return base64.b64encode((shapes / f"shape_{number:03d}.png").read_bytes()).decode()


def _read(folder):
    """The dataset as the trainer reads it."""
    return scan_dataset(folder, trigger_word=None, trigger_words={})


def _read_captioned(root, captions: dict[str, list[str]]):
    """A dataset of one concept folder per entry, its images captioned as listed, as the trainer reads it."""
    for folder, texts in captions.items():
        make_shape_dataset(root / folder, len(texts))
        for number, caption in enumerate(texts):
            (root / folder / f"shape_{number:03d}.txt").write_text(caption)
    return _read(root)


def test_an_upload_with_one_folder_level_makes_repeats_validation_and_class_images(server_workspace, tmp_path):
    shapes = tmp_path / "shapes"
    make_shape_dataset(shapes, 4)
    folder = server_workspace / "datasets" / "kohya"

    async def script(session):
        first = await session.call_tool(
            "upload-dataset",
            {
                "dataset_name": "kohya",
                "images": [
                    {"filename": "10_cat/a.png", "content": _png(shapes, 0), "caption": "a cat on a sofa"},
                    {"filename": "validation/b.png", "content": _png(shapes, 1), "caption": "a cat held out"},
                    {"filename": "class/c.png", "content": _png(shapes, 2), "caption": "a cat"},
                ],
            },
        )
        assert not first.is_error, first.content
        assert [(f["filename"], f["saved"]) for f in first.structured_content["files"]] == [
            ("10_cat/a.png", True),
            ("validation/b.png", True),
            ("class/c.png", True),
        ]
        assert (folder / "10_cat" / "a.txt").read_text() == "a cat on a sofa"  # the caption beside its image
        more = await session.call_tool(  # appending to the dataset, in the same folder
            "upload-dataset",
            {"dataset_name": "kohya", "images": [{"filename": "10_cat/d.png", "content": _png(shapes, 3)}]},
        )
        assert not more.is_error, more.content

        info = await session.call_tool("get-dataset-info", {"dataset_name": "kohya"})
        assert not info.is_error, info.content
        report = info.structured_content
        assert [(c["folder"], c["repeats"], c["images"]) for c in report["concepts"]] == [("10_cat", 10, 2)]
        assert (report["images"], report["validation_images"]) == (2, 1)
        listed = await session.call_tool("list-datasets", {})
        assert [(d["name"], d["images"]) for d in listed.structured_content["datasets"]] == [("kohya", 4)]
        thumbnail = await session.read_resource("lora://datasets/kohya/images/10_cat/a.png")
        assert base64.b64decode(thumbnail.contents[0].blob).startswith(b"\x89PNG")

    run_session(server_workspace, script)
    index = _read(folder)
    assert [(c.folder, c.repeats, c.num_images) for c in index.concepts] == [("10_cat", 10, 2)]
    assert [r.path.name for r in index.validation] == ["b.png"]
    assert [p.name for p in index.class_images] == ["c.png"]  # prior-preservation images, never trained as a concept


def test_bad_folder_names_are_refused_and_nothing_is_written(server_workspace, tmp_path):
    shapes = tmp_path / "shapes"
    make_shape_dataset(shapes, 1)
    bad = ["a/b/c.png", "../x.png", "/x.png", "a\\b.png", "./x.png", "x/", "10_cat//y.png", "../10_cat/y.png"]

    async def script(session):
        refused = await session.call_tool(
            "upload-dataset",
            {"dataset_name": "bad", "images": [{"filename": name, "content": _png(shapes, 0)} for name in bad]},
        )
        assert refused.is_error
        text = refused.content[0].text
        assert "one folder level" in text and "a/b/c.png" in text  # what was wrong and what to do, per file
        assert "'..'" in text and "backslash" in text

    run_session(server_workspace, script)
    assert not (server_workspace / "datasets" / "bad").exists()
    assert not (server_workspace / "datasets" / "x.png").exists()
    assert not (server_workspace / "x.png").exists()


def test_a_neutral_concept_folder_does_not_become_a_trigger_when_captions_carry_one(server_workspace, tmp_path):
    shapes = tmp_path / "shapes"
    make_shape_dataset(shapes, 4)
    captions = {
        "concept1/x1.png": "xyz_cat photo of a cat",
        "concept1/x2.png": "xyz_cat, sitting on a sofa",
        "concept2/y1.png": "a photo of a dog",
        "concept2/y2.png": "a dog running on grass",
    }
    images = [
        {"filename": name, "content": _png(shapes, number), "caption": caption}
        for number, (name, caption) in enumerate(captions.items())
    ]

    async def script(session):
        uploaded = await session.call_tool("upload-dataset", {"dataset_name": "concepts", "images": images})
        assert not uploaded.is_error, uploaded.content
        info = await session.call_tool("get-dataset-info", {"dataset_name": "concepts"})
        concepts = {c["folder"]: c for c in info.structured_content["concepts"]}
        assert concepts["concept1"]["trigger_word"] == "xyz_cat"
        assert "captions" in concepts["concept1"]["trigger_reason"]
        assert concepts["concept2"]["trigger_word"] == "concept2"
        assert "folder" in concepts["concept2"]["trigger_reason"]
        config = {"name": "two", "model_name": "builtin:tiny-sd15", "dataset_path": "concepts", "steps": 2}
        created = await session.call_tool("create-training-config", config)
        assert not created.is_error, created.content
        checked = (await session.call_tool("validate-training-config", {"name": "two"})).structured_content
        [said] = [w for w in checked["warnings"] if "concept triggers" in w]  # what start-training warns too
        assert "concept1 -> 'xyz_cat'" in said and "concept2 -> 'concept2'" in said

    run_session(server_workspace, script)
    index = _read(server_workspace / "datasets" / "concepts")
    used = {f"{r.path.parent.name}/{r.path.name}": r.caption for r in index.images}
    assert used["concept1/x1.png"] == "xyz_cat photo of a cat"  # no 'concept1' put in
    assert used["concept1/x2.png"] == "xyz_cat, sitting on a sofa"
    assert used["concept2/y1.png"] == "concept2 a photo of a dog"  # no trigger of its own: the folder's name
    assert any("concept1" in w and "xyz_cat" in w and "concept2" in w for w in index.warnings)  # said, with why


def test_a_shared_or_plain_first_word_is_no_concepts_own_trigger(tmp_path):
    index = _read_captioned(
        tmp_path,
        {
            "10_cat": ["xyz_all a cat", "xyz_all a cat again"],  # starts another concept's captions too
            "dog": ["xyz_all a dog", "xyz_all a dog again"],
            "girl": ["1girl, solo", "1girl, smiling"],  # a booru tag, not a trigger
            "sks": ["sks1 on a chair", "sks1 standing"],
        },
    )
    assert {c.folder: c.trigger_word for c in index.concepts} == {
        "10_cat": "cat",
        "dog": "dog",
        "girl": "girl",
        "sks": "sks1",
    }
    assert {r.caption for r in index.images if r.folder == "sks"} == {"sks1 on a chair", "sks1 standing"}
    assert {r.caption for r in index.images if r.folder == "girl"} == {"girl 1girl, solo", "girl 1girl, smiling"}


def test_a_neutral_folder_takes_its_captions_own_first_word_a_named_one_only_a_triggers_shape(tmp_path):
    index = _read_captioned(
        tmp_path,
        {
            "concept1": ["ohwx man smiling", "ohwx man at a desk"],  # any shape in a neutral folder
            "10_xyz_cat": ["cat sitting", "cat lying"],  # a named folder: 'cat' is a plain word, xyz_cat stays
            "images": ["a photo of a dog", "a dog on grass"],  # a stop word is nobody's trigger
            "2_set_3": ["photo of sks, a toy", "photo of sks on a shelf"],
        },
    )
    assert {c.folder: c.trigger_word for c in index.concepts} == {
        "concept1": "ohwx",
        "10_xyz_cat": "xyz_cat",
        "images": "images",
        "2_set_3": "set_3",
    }
    used = {f: sorted(r.caption for r in index.images if r.folder == f) for f in ("concept1", "10_xyz_cat")}
    assert used["concept1"] == ["ohwx man at a desk", "ohwx man smiling"]  # trained as written
    assert used["10_xyz_cat"] == ["xyz_cat cat lying", "xyz_cat cat sitting"]


def test_the_datasets_class_folder_is_read_and_the_missing_class_images_are_generated_in_the_run(tmp_path):
    from conftest import fast_config

    from training.trainer import Trainer

    dataset = tmp_path / "dataset"
    make_shape_dataset(dataset / "5_xyz_shape", 2)
    [given] = make_shape_dataset(dataset / "class" / "kept", 1, seed=4)  # in a subfolder: counted all the same
    given.with_suffix(".txt").write_text("a red square, a shape")

    def files():
        return sorted((str(p.relative_to(dataset)), p.stat().st_mtime_ns) for p in dataset.rglob("*"))

    before = files()
    config = fast_config(dataset, steps=1, prior_preservation=True, class_prompt="a shape", num_class_images=2)
    trainer = Trainer(config, tmp_path / "run")
    trainer.setup()
    assert files() == before  # the user's dataset is read, never written
    generated = list((tmp_path / "run" / "class_images").iterdir())
    assert len(generated) == 1
    class_records = {r.path: r for r in trainer.data.records if r.concept == "class"}
    assert sorted(class_records) == sorted([given, *generated])
    assert class_records[given].caption == "a red square, a shape"  # its own caption, as kohya's reg images
    assert class_records[generated[0]].caption == "a shape"  # none of its own: class_prompt
    assert all(r.folder == "5_xyz_shape" for r in trainer.dataset.images)  # never trained as a concept
    trainer.cleanup(trainer.finish())
