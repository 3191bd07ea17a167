"""The device's memory while a run trains: what is in use after each step (metrics.jsonl's `memory_gb`, CUDA only),
and a spill into shared system memory noticed as it happens: a warning in status.json and train.log, and with
`auto_stop_on: [memory_spill]` a stop whose reason names the fix (diagnose-training's memory-spill finding has it as
a patch). The judgement is training/diagnostics/memory_rules.py's `spill`, the one diagnose-training makes."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import torch

from training.diagnostics.memory_rules import SPILL_WINDOW, spill, spill_message
from training.run_files import StatusWriter

log = logging.getLogger("training")

# Steps the live check looks back over for the run's fastest window: a spill shows within a few windows of its
# start, and 1,000 floats cost nothing.
SPILL_HISTORY = 1000


def memory_in_use_gb(device: torch.device) -> float | None:
    """The device's memory in use by every process, in GiB like status.json's `device_memory_gb`, as the driver
    reports it; None off CUDA. Every process counts: a desktop or a browser on the same card brings the spill closer
    just as the trainer's own tensors do."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return round((total - free) / 2**30, 3)


class MemoryWatch:
    """After each step: the memory in use, for its metrics row, and every SPILL_WINDOW steps the spill check over
    the recent steps. A spill is reported once; `stop_wanted` turns true with `auto_stop_on: [memory_spill]`."""

    def __init__(
        self, measure: Callable[[], float | None], device_gb: float | None, stop_on_spill: bool, status: StatusWriter
    ):
        self._measure = measure  # () -> GiB in use: memory_in_use_gb of the run's device
        self._device_gb, self._stop_on_spill, self._status = device_gb, stop_on_spill, status
        self._times: deque[float] = deque(maxlen=SPILL_HISTORY)
        self._used: deque[float | None] = deque(maxlen=SPILL_HISTORY)
        self.spilled = False
        self.stop_wanted = False

    def after_step(self, step: int, seconds: float) -> dict:
        """The metrics row's memory field ({} where it is not measured)."""
        used = self._measure()
        self._times.append(seconds)
        self._used.append(used)
        if not self.spilled and step % SPILL_WINDOW == 0:
            self._observe(step)
        return {} if used is None else {"memory_gb": used}

    def _observe(self, step: int) -> None:
        facts = spill(list(self._times), list(self._used), self._device_gb)
        if facts is None:
            return
        self.spilled = True
        message = spill_message(facts, step)
        log.warning("%s", message)
        self._status.warn(message)
        if self._stop_on_spill:
            self._status.update(stop_reason=f"auto_stop_on memory_spill: {message}")
            self.stop_wanted = True
