"""Aspect-ratio buckets and the order in which batches are drawn.

Buckets have sides in multiples of `step` (the VAE factor times the UNet's downsampling:
64 px for SD, 16 px for the tiny built-ins) and an area of at most resolution^2, so a
512 px run trains a 640x384 landscape as 640x384 rather than cropping it to 512x512.
Images smaller than their bucket are never upscaled: they get a bucket of their own size
(rounded down to the step), as kohya's bucket_no_upscale does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

Bucket = tuple[int, int]  # (width, height)

MAX_ASPECT = 2.0  # widest bucket is 2:1, as in kohya's defaults (e.g. 768x384 at 512 px)


def make_buckets(resolution: int, step: int) -> list[Bucket]:
    side = max(step, resolution // step * step)
    max_area = side * side
    buckets = {(side, side)}
    width = side + step
    while True:
        height = max_area // width // step * step
        if height < step or width / height > MAX_ASPECT:
            break
        buckets.update({(width, height), (height, width)})
        width += step
    return sorted(buckets)


def assign_bucket(size: tuple[int, int], buckets: list[Bucket], step: int) -> Bucket:
    """The bucket with the closest aspect ratio, if the image covers it on both sides.

    Otherwise (no upscaling) the image gets a bucket of its own: its aspect clamped to 2:1 (the
    excess is cropped), shrunk to the buckets' area if larger, sides rounded down to the step.
    """
    width, height = size
    target = min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(width / height)))
    if width >= target[0] and height >= target[1]:
        return target
    width, height = min(width, height * MAX_ASPECT), min(height, width * MAX_ASPECT)
    max_area = max(b[0] * b[1] for b in buckets)
    shrink = min(1.0, math.sqrt(max_area / (width * height)))
    return (max(step, int(width * shrink) // step * step), max(step, int(height * shrink) // step * step))


def square_bucket(resolution: int, step: int) -> Bucket:
    side = max(step, resolution // step * step)
    return (side, side)


@dataclass(frozen=True)
class BatchPosition:
    epoch: int
    index: int  # batches of this epoch already consumed


class BucketBatches:
    """Deterministic batches of same-bucket samples: the order of epoch e depends only on
    (seed, e), so resuming needs nothing but the position (epoch, index)."""

    def __init__(self, sample_buckets: list[Bucket], batch_size: int, seed: int):
        self._by_bucket: dict[Bucket, list[int]] = defaultdict(list)
        for sample, bucket in enumerate(sample_buckets):
            self._by_bucket[bucket].append(sample)
        self._batch_size = batch_size
        self._seed = seed
        self.batches_per_epoch = sum(math.ceil(len(s) / batch_size) for s in self._by_bucket.values())

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self._seed, epoch])
        batches = []
        for bucket in sorted(self._by_bucket):
            samples = self._by_bucket[bucket]
            order = [samples[i] for i in rng.permutation(len(samples))]
            batches += [order[i : i + self._batch_size] for i in range(0, len(order), self._batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def bucket_sizes(self) -> dict[Bucket, int]:
        return {bucket: len(samples) for bucket, samples in sorted(self._by_bucket.items())}
