"""Per-step caption augmentation: dropout and tag shuffling."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from training.data.captions import augment_caption

CAPTION = "xyz_style a red circle, blue background, flat colours, centered, simple, vector art"
TAGS = [t.strip() for t in CAPTION.split(",")]


def augment(caption=CAPTION, *, seed=0, dropout_rate=0.0, shuffle=False, keep_tokens=1) -> str:
    return augment_caption(
        caption, dropout_rate=dropout_rate, shuffle=shuffle, keep_tokens=keep_tokens, rng=np.random.default_rng(seed)
    )


def tags_of(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",")]


def test_full_dropout_empties_the_caption():
    for seed in range(20):
        assert augment(seed=seed, dropout_rate=1.0) == ""
        assert augment(seed=seed, dropout_rate=1.0, shuffle=True) == ""


def test_no_dropout_keeps_the_caption():
    for seed in range(20):
        assert augment(seed=seed, dropout_rate=0.0) == CAPTION


def test_partial_dropout_drops_about_that_share():
    rng = np.random.default_rng(123)
    results = [augment_caption(CAPTION, dropout_rate=0.3, shuffle=False, keep_tokens=1, rng=rng) for _ in range(2000)]
    dropped = sum(r == "" for r in results)
    assert set(results) == {"", CAPTION}
    assert 0.25 < dropped / len(results) < 0.35


@pytest.mark.parametrize("keep_tokens", [1, 2, 3])
def test_shuffle_keeps_the_leading_tags_and_permutes_the_rest(keep_tokens):
    orders = set()
    for seed in range(20):
        tags = tags_of(augment(seed=seed, shuffle=True, keep_tokens=keep_tokens))
        assert tags[:keep_tokens] == TAGS[:keep_tokens]
        assert Counter(tags) == Counter(TAGS)
        orders.add(tuple(tags[keep_tokens:]))
    assert len(orders) > 1, "shuffling never changed the order"


def test_keep_tokens_zero_may_move_the_first_tag():
    firsts = set()
    for seed in range(30):
        tags = tags_of(augment(seed=seed, shuffle=True, keep_tokens=0))
        assert Counter(tags) == Counter(TAGS)
        firsts.add(tags[0])
    assert len(firsts) > 1
    assert firsts - {TAGS[0]}


def test_keep_tokens_beyond_the_tag_count_keeps_everything():
    assert augment("a, b, c", shuffle=True, keep_tokens=5) == "a, b, c"


def test_same_seed_same_result():
    for seed in (0, 1, 42):
        a = augment(seed=seed, shuffle=True, dropout_rate=0.5, keep_tokens=1)
        b = augment(seed=seed, shuffle=True, dropout_rate=0.5, keep_tokens=1)
        assert a == b
    results = {augment(seed=s, shuffle=True, keep_tokens=1) for s in range(10)}
    assert len(results) > 1


def test_shuffle_drops_empty_tags_and_normalises_spaces():
    out = augment("a,  b ,, c,", shuffle=True, keep_tokens=3, seed=0)
    assert out == "a, b, c"


def test_empty_caption_stays_empty():
    assert augment("", shuffle=True) == ""
    assert augment("", shuffle=False) == ""
