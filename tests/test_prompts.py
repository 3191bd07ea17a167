"""Caption encoding: plain CLIP at 75 tokens, kohya-style chunks beyond, clip_skip."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from training.prompts import encode_prompts


@pytest.fixture(scope="module")
def clip(tiny_sd15):
    return CLIPTokenizer.from_pretrained(tiny_sd15 / "tokenizer"), CLIPTextModel.from_pretrained(
        tiny_sd15 / "text_encoder"
    ).eval()


def encode(clip, prompts, **kwargs):
    tokenizer, text_encoder = clip
    with torch.no_grad():
        return encode_prompts(tokenizer, text_encoder, prompts, **kwargs)


def test_75_tokens_is_plain_clip_encoding(clip):
    tokenizer, text_encoder = clip
    ids = tokenizer(
        ["xyz_shape a red circle"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        plain = text_encoder(ids).last_hidden_state
    assert torch.equal(encode(clip, ["xyz_shape a red circle"], max_token_length=75, clip_skip=1), plain)


@pytest.mark.parametrize("max_tokens, positions", [(150, 152), (225, 227)])
def test_long_prompts_are_encoded_in_chunks(clip, max_tokens, positions):
    short = encode(clip, ["a cat"], max_token_length=75, clip_skip=1)
    long = encode(clip, ["a cat"], max_token_length=max_tokens, clip_skip=1)
    assert long.shape == (1, positions, 32)
    assert torch.equal(long[:, :76], short[:, :76])  # the first chunk is the plain encoding


def test_words_past_75_tokens_count_only_with_a_longer_limit(clip):
    # The tiny tokenizer has one token per character: 100 characters of padding push the last word past 75.
    head = "x" * 100
    a, b = f"{head} red", f"{head} blue"
    assert torch.equal(
        encode(clip, [a], max_token_length=75, clip_skip=1), encode(clip, [b], max_token_length=75, clip_skip=1)
    )
    assert not torch.equal(
        encode(clip, [a], max_token_length=150, clip_skip=1), encode(clip, [b], max_token_length=150, clip_skip=1)
    )


def test_clip_skip_takes_the_earlier_layer_through_the_final_norm(clip):
    tokenizer, text_encoder = clip
    ids = tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = text_encoder.final_layer_norm(hidden)
    skipped = encode(clip, ["a cat"], max_token_length=75, clip_skip=2)
    assert torch.allclose(skipped, expected)
    assert not torch.allclose(skipped, encode(clip, ["a cat"], max_token_length=75, clip_skip=1))
