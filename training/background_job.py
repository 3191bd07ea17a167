"""What every background job child other than the trainer shares (captioning, generation): the
command line `python -m <module> RUN_DIR`, the run directory's stop-request file (and SIGINT/SIGTERM
where signals exist) as a stop request, and the run directory's train.log and status.json while it
works."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from training.run_files import RunFiles, StatusWriter

EXIT_CODES = {"completed": 0, "stopped": 130}  # as lora-train's; anything else (failed) is 1


class StopRequest(threading.Event):
    """Set by SIGINT/SIGTERM, or by the run directory's stop-request file (the stop every platform has),
    which `is_set` looks for each time the job asks: after every batch or image."""

    def __init__(self, files: RunFiles):
        super().__init__()
        self._files = files

    def is_set(self) -> bool:
        return super().is_set() or self._files.stop_requested()


def job_main(module: str, argv: list[str] | None, run: Callable[[Path, threading.Event], str]) -> int:
    """Run `run(run_dir, stop)` for `python -m <module> RUN_DIR`; `stop` (a StopRequest), which the job
    honours between batches, is set by the first SIGINT/SIGTERM or the stop-request file."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not (Path(args[0]) / "request.json").is_file():
        print(f"usage: python -m {module} RUN_DIR (a folder holding request.json)", file=sys.stderr)
        return 2
    # Library chatter (loading bars, optional-backend notices) would drown the job's own lines.
    for variable in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    files = RunFiles(Path(args[0]))
    stop = StopRequest(files)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        return EXIT_CODES.get(run(files.dir, stop), 1)
    finally:
        files.clear_stop_request()  # honoured, or too late: a resumed job starts clean


@contextmanager
def job_files(run_dir: Path, log: logging.Logger, total: int) -> Iterator[tuple[RunFiles, StatusWriter]]:
    """The run directory's files, with `log` written to train.log and a status heartbeat started
    (step 0 of `total`) for the duration; the job finishes the status itself."""
    files = RunFiles(run_dir)
    status = StatusWriter(files.status, total_steps=total)
    handler = logging.FileHandler(files.log, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield files, status
    finally:
        log.removeHandler(handler)
        handler.close()
