"""The text-encoder cache (in memory or on disk) and the progress of the encoding before step 1.

On disk, each caption's states are one safetensors file named by a hash of the caption and of the
options that change its encoding (max_token_length, clip_skip), so an augmented caption (the empty
one of caption dropout included) finds its own entry. A batch reads its entries back through
safetensors' memory map and drops them after the step: the process holds no per-caption tensors,
and its memory does not grow with the dataset (issue 14: a 2,000-caption tiny-FLUX cache held
125 MiB in memory, 64 KiB of T5 states per caption; a real FLUX caption holds 8 MiB).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file

from training.prompts import TextConditioning
from training.workspace import atomic_output

log = logging.getLogger("training")
LOG_EVERY_S = 10.0  # a progress line in train.log at most this often while caching (and at the end)

PhaseReport = Callable[[str], None]  # takes e.g. "caching latents 640/2000", for status.json's `phase`


class CacheProgress:
    """Counts encoded entries: every chunk updates the status's phase (the heartbeat writes it
    within 2 s), and the log gets a line every LOG_EVERY_S seconds and one at the end."""

    def __init__(self, what: str, total: int, report: PhaseReport | None):
        self._what, self._total, self._report = what, total, report
        self._done = 0
        self._started = self._logged = time.monotonic()

    def advance(self, count: int) -> None:
        self._done += count
        phase = f"{self._what} {self._done}/{self._total}"
        if self._report is not None:
            self._report(phase)
        now = time.monotonic()
        if now - self._logged >= LOG_EVERY_S or self._done >= self._total:
            self._logged = now
            log.info("%s (%.1f s)", phase, now - self._started)


class TextCache:
    """Caption -> its TextConditioning (one caption's: states (tokens, hidden), pooled (projection) or None,
    mask (tokens) or None), kept in memory or in `folder`; `on_disk` is None until the first encoded chunk
    tells how big the cache would be."""

    def __init__(self, folder: Path, *, max_token_length: int, clip_skip: int):
        self.folder = folder
        self.on_disk: bool | None = None
        self.ready = False  # every caption of the dataset is in
        self._options = f"{max_token_length}|{clip_skip}"
        self._memory: dict[str, TextConditioning] = {}

    def put(self, caption: str, text: TextConditioning) -> None:
        if not self.on_disk:
            self._memory[caption] = text
            return
        tensors = {"states": text.states, "pooled": text.pooled, "mask": text.mask}
        tensors = {name: tensor.contiguous().clone() for name, tensor in tensors.items() if tensor is not None}
        with atomic_output(self._file(caption)) as tmp:
            save_file(tensors, str(tmp))

    def get(self, caption: str) -> TextConditioning:
        if not self.on_disk:
            return self._memory[caption]
        tensors = load_file(str(self._file(caption)))
        return TextConditioning(tensors["states"], tensors.get("pooled"), tensors.get("mask"))

    def _file(self, caption: str) -> Path:
        digest = hashlib.sha256(f"{self._options}|{caption}".encode()).hexdigest()
        return self.folder / f"{digest[:32]}.safetensors"
