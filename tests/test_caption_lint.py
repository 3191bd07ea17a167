"""Caption lint: each rule of the guide, on crafted captions."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from training.data.caption_lint import lint_captions
from training.data.dataset import scan_dataset


def dataset(folder: Path, captions: dict[str, str | None]) -> Path:
    for relative, caption in captions.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (120, 80, 40)).save(path)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption)
    return folder


GOOD = "xyz_style digital painting of a landscape, vibrant colors, fantasy art style, highly detailed"


def rules(findings) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for finding in findings:
        found.setdefault(finding.file, set()).add(finding.rule)
    return found


def test_good_captions_pass(tmp_path):
    folder = dataset(tmp_path / "d", {"a.png": GOOD, "b.png": GOOD.replace("landscape", "harbour")})
    assert lint_captions(scan_dataset(folder, trigger_word="xyz_style", trigger_words={})) == []


def test_each_rule_names_the_file_and_a_fix(tmp_path):
    folder = dataset(
        tmp_path / "d",
        {
            "empty.png": "",
            "late.png": "digital painting of xyz_style, vibrant colors, art style, detailed",
            "thin.png": "xyz_style a cat",
            "dup1.png": GOOD,
            "dup2.png": GOOD,
            "long.png": "xyz_style " + ", ".join(["a very long caption"] * 30),
        },
    )
    findings = lint_captions(scan_dataset(folder, trigger_word="xyz_style", trigger_words={}))
    assert rules(findings) == {
        "empty.png": {"empty"},
        "late.png": {"trigger-first"},
        "thin.png": {"structure"},
        "dup1.png": {"duplicate"},
        "dup2.png": {"duplicate"},
        "long.png": {"too-long"},
    }
    assert all(f.suggestion for f in findings)
    assert next(f for f in findings if f.file == "dup1.png").message.endswith("dup2.png")


def test_generic_trigger_words_per_concept(tmp_path):
    folder = dataset(tmp_path / "d", {"style/a.png": "style painting of a hill, oil, detailed, wide shot"})
    findings = lint_captions(scan_dataset(folder, trigger_word=None, trigger_words={}))
    assert rules(findings) == {"style/a.png": {"generic-trigger"}}
    assert "xyz_style" in findings[0].suggestion


def test_flux_captions_need_angle_environment_and_lighting(tmp_path):
    folder = dataset(
        tmp_path / "d",
        {
            "full.png": "xyz_style portrait of a knight, three-quarter view, in a medieval castle, torch lighting",
            "bare.png": "xyz_style portrait of a knight, oil painting, detailed",
        },
    )
    index = scan_dataset(folder, trigger_word="xyz_style", trigger_words={})
    findings = lint_captions(index, flux=True)
    assert rules(findings) == {"bare.png": {"flux-elements"}}
    assert "environment" in findings[0].message and "lighting" in findings[0].message
    assert lint_captions(index) == []  # not a FLUX model: no such rule


def test_token_length_uses_the_models_tokenizer(tmp_path, tiny_sd15):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd15 / "tokenizer")
    folder = dataset(tmp_path / "d", {"a.png": GOOD})  # 13 words, but ~90 byte-level tokens in the tiny vocab
    index = scan_dataset(folder, trigger_word="xyz_style", trigger_words={})

    def count(text: str) -> int:
        return len(tokenizer(text).input_ids) - 2

    assert lint_captions(index) == []
    assert [f.rule for f in lint_captions(index, count_tokens=count)] == ["too-long"]
    assert lint_captions(index, max_tokens=150, count_tokens=count) == []
