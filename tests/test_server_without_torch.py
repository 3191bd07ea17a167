"""The server never imports torch, diffusers or transformers: what it used them for is done without them
(token counts with the `tokenizers` library) and checked here against them (this test process may import
them), and every tool called over stdio leaves them out of the server's modules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from server.inspection import clip_tokenizer
from training.models.builtin import byte_symbols

CAPTIONS = [
    "wc_style, a watercolor painting of a red fox in the snow",
    "  Mixed   CASE\twith\ttabs and\nnew lines  ",
    "numbers 1234 and 3.5 and -7, punctuation!!! (brackets) [more] {braces} 'quotes' \"double\"",
    "it's they're we've I'm you'll he'd",
    "café naïve Zürich déjà vu, ÅNGSTRÖM",
    "日本語のキャプション and emoji 🦊🎨",
    "the the the thethe there their",
    "<|endoftext|> inside a caption",
    "",
]


def merged_clip_folder(folder: Path) -> Path:
    """vocab.json and merges.txt (no tokenizer.json, as SD 1.5's folder) with byte-level symbols and a few
    merges, so that words are split into more than bytes."""
    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = [("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("a", "t"), ("i", "n"), ("in", "g</w>"), ("r", "e")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{left} {right}" for left, right in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab and merges"])
def test_token_counts_equal_transformers_clip_tokenizer(layout, tiny_sd15, tmp_path):
    folder = tiny_sd15 / "tokenizer" if layout == "tokenizer.json" else merged_clip_folder(tmp_path / "tokenizer")
    reference = CLIPTokenizer.from_pretrained(str(folder))
    ours = clip_tokenizer(folder)
    for caption in CAPTIONS:
        expected = len(reference(caption).input_ids) - 2  # as lint-captions counted with transformers
        assert len(ours.encode(caption, add_special_tokens=False).ids) == expected, caption
    if layout != "tokenizer.json":  # the merges are used: fewer tokens than bytes
        assert len(ours.encode("the thing", add_special_tokens=False).ids) < len("thething")
