"""Aspect-ratio buckets, assigning images to them, and the deterministic batch order."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from training.data.buckets import BucketBatches, assign_bucket, make_buckets, square_bucket

# --- make_buckets -------------------------------------------------------------------------------


@pytest.mark.parametrize(("resolution", "step"), [(512, 64), (768, 64), (1024, 64), (64, 16), (256, 16)])
def test_bucket_rules(resolution, step):
    buckets = make_buckets(resolution, step)
    assert (resolution, resolution) in buckets
    assert len(buckets) == len(set(buckets))
    assert buckets == sorted(buckets)
    for width, height in buckets:
        assert width % step == 0 and height % step == 0
        assert width >= step and height >= step
        assert width * height <= resolution * resolution
        assert max(width, height) / min(width, height) <= 2.0
        assert (height, width) in buckets  # both orientations


def test_buckets_at_512():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets
    landscape = [b for b in buckets if b[0] > b[1]]
    portrait = [b for b in buckets if b[0] < b[1]]
    assert landscape and len(landscape) == len(portrait)
    assert (640, 384) in buckets and (384, 640) in buckets


def test_buckets_of_the_tiny_models():
    assert sorted(make_buckets(64, 16)) == sorted([(64, 64), (80, 48), (48, 80)])


def test_resolution_off_the_step_is_rounded_down():
    assert (512, 512) in make_buckets(520, 64)
    assert all(w * h <= 512 * 512 for w, h in make_buckets(520, 64))


# --- assign_bucket --------------------------------------------------------------------------------


def aspect(bucket) -> float:
    return bucket[0] / bucket[1]


def test_landscape_portrait_and_square_images():
    buckets = make_buckets(512, 64)
    wide = assign_bucket((1024, 512), buckets, 64)
    tall = assign_bucket((512, 1024), buckets, 64)
    square = assign_bucket((800, 800), buckets, 64)
    assert wide in buckets and wide[0] > wide[1]
    assert tall in buckets and tall[0] < tall[1]
    assert tall == (wide[1], wide[0])
    assert square == (512, 512)
    # the chosen landscape bucket is the widest one available for a 2:1 image
    assert aspect(wide) == max(aspect(b) for b in buckets)


@pytest.mark.parametrize(
    ("size", "expected"),
    [((768, 512), (640, 384)), ((700, 600), (576, 448)), ((900, 540), (640, 384)), ((600, 512), (576, 448))],
)
def test_closest_aspect_wins(size, expected):
    buckets = make_buckets(512, 64)
    chosen = assign_bucket(size, buckets, 64)
    assert chosen == expected
    target = math.log(size[0] / size[1])
    assert all(abs(math.log(aspect(chosen)) - target) <= abs(math.log(aspect(b)) - target) for b in buckets)


@pytest.mark.parametrize(
    ("size", "resolution", "step"),
    [((300, 200), 512, 64), ((100, 60), 512, 16), ((200, 300), 512, 64), ((130, 130), 512, 64), ((50, 40), 64, 16)],
)
def test_small_images_are_not_upscaled(size, resolution, step):
    bucket = assign_bucket(size, make_buckets(resolution, step), step)
    assert bucket[0] <= size[0] and bucket[1] <= size[1]
    assert bucket[0] % step == 0 and bucket[1] % step == 0
    assert bucket[0] >= step and bucket[1] >= step
    # rounded down, not further: one more step would not fit
    assert bucket[0] + step > size[0] and bucket[1] + step > size[1]


def test_small_image_examples():
    assert assign_bucket((300, 200), make_buckets(512, 64), 64) == (256, 192)
    assert assign_bucket((100, 60), make_buckets(512, 16), 16) == (96, 48)


def test_side_below_the_step_still_gets_one_step():
    # 60 px cannot be rounded down to a positive multiple of 64: the bucket keeps one step
    assert assign_bucket((100, 60), make_buckets(512, 64), 64) == (64, 64)


@pytest.mark.parametrize("size", [(1000, 300), (300, 1000)])
def test_elongated_images_are_not_upscaled_either(size):
    bucket = assign_bucket(size, make_buckets(512, 64), 64)
    assert bucket[0] <= size[0] and bucket[1] <= size[1]


# --- square_bucket -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resolution", "step", "expected"),
    [(520, 64, (512, 512)), (512, 64, (512, 512)), (575, 64, (512, 512)), (64, 16, (64, 64)), (30, 64, (64, 64))],
)
def test_square_bucket_rounds_down_to_the_step(resolution, step, expected):
    assert square_bucket(resolution, step) == expected


# --- BucketBatches --------------------------------------------------------------------------------------

SQUARE, WIDE, TALL = (64, 64), (80, 48), (48, 80)


def sample_buckets() -> list[tuple[int, int]]:
    # 5 square, 3 wide, 1 tall, interleaved
    return [SQUARE, WIDE, SQUARE, TALL, SQUARE, WIDE, SQUARE, SQUARE, WIDE]


def test_batches_hold_one_bucket_and_cover_every_sample_once():
    buckets = sample_buckets()
    batches = BucketBatches(buckets, batch_size=2, seed=7)
    for e in range(5):
        epoch = batches.epoch(e)
        assert len(epoch) == batches.batches_per_epoch
        for batch in epoch:
            assert 1 <= len(batch) <= 2
            assert len({buckets[i] for i in batch}) == 1
        flat = [i for batch in epoch for i in batch]
        assert sorted(flat) == list(range(len(buckets)))


@pytest.mark.parametrize(("batch_size", "expected"), [(1, 9), (2, 3 + 2 + 1), (3, 2 + 1 + 1), (4, 2 + 1 + 1), (16, 3)])
def test_batches_per_epoch_counts_partial_batches(batch_size, expected):
    batches = BucketBatches(sample_buckets(), batch_size=batch_size, seed=0)
    assert batches.batches_per_epoch == expected
    assert len(batches.epoch(0)) == expected
    sizes = Counter(len(b) for b in batches.epoch(0))
    assert sum(n * count for n, count in sizes.items()) == 9


def test_epoch_order_is_deterministic_and_varies():
    buckets = [SQUARE] * 12 + [WIDE] * 8
    one = BucketBatches(buckets, batch_size=2, seed=1)
    same = BucketBatches(buckets, batch_size=2, seed=1)
    other_seed = BucketBatches(buckets, batch_size=2, seed=2)
    assert one.epoch(0) == same.epoch(0)
    assert one.epoch(3) == same.epoch(3)
    assert one.epoch(3) == one.epoch(3)  # asking twice changes nothing
    assert one.epoch(0) != one.epoch(1)
    assert one.epoch(0) != other_seed.epoch(0)


def test_bucket_sizes():
    batches = BucketBatches(sample_buckets(), batch_size=2, seed=0)
    assert batches.bucket_sizes() == {TALL: 1, SQUARE: 5, WIDE: 3}
    assert list(batches.bucket_sizes()) == sorted([TALL, SQUARE, WIDE])


def test_no_samples_no_batches():
    batches = BucketBatches([], batch_size=2, seed=0)
    assert batches.batches_per_epoch == 0
    assert batches.epoch(0) == []
    assert batches.bucket_sizes() == {}


def test_random_crop_moves_the_window_and_center_does_not(tmp_path):
    import numpy as np
    from PIL import Image

    from training.data.images import load_pixels

    path = tmp_path / "wide.png"
    gradient = np.tile(np.arange(256, dtype=np.uint8), (64, 1))
    Image.fromarray(np.stack([gradient] * 3, axis=-1)).save(path)  # 256x64, left dark, right bright
    center = [
        load_pixels(path, (64, 64), random_crop=False, flip=False, rng=np.random.default_rng(s)) for s in range(4)
    ]
    assert all(c.equal(center[0]) for c in center)
    crops = [load_pixels(path, (64, 32), random_crop=True, flip=False, rng=np.random.default_rng(s)) for s in range(8)]
    assert len({round(c.mean().item(), 4) for c in crops}) > 1
    flipped = load_pixels(path, (64, 64), random_crop=False, flip=True, rng=None)
    assert flipped.equal(center[0].flip(-1))
