"""Space a finished job's run directory takes, and what pruning it frees: old checkpoints (only a resume
reads them; a finished job's LoRA is its own file) and the latent and text caches (a resume or a new run
encodes them again)."""

from __future__ import annotations

import shutil
from pathlib import Path

from training.config import ConfigError
from training.diagnostics.checkpoints import recommend_checkpoint
from training.diagnostics.evidence import RunEvidence
from training.run_files import RunFiles


def size_of(path: Path) -> int:
    """Bytes of the files under `path` (or of the file), links not followed: what deleting it frees."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    if not path.is_dir():
        return 0
    return sum(entry.lstat().st_size for entry in path.rglob("*") if entry.is_symlink() or entry.is_file())


def prunable(run_dir: Path, *, keep_checkpoints: int, caches: bool) -> list[Path]:
    """What pruning removes from a finished run: every checkpoint but the newest `keep_checkpoints` and the
    one the run's evidence recommends (as diagnose-training would; kept during training too), and with
    `caches` its latent and text caches."""
    files = RunFiles(run_dir)
    checkpoints = files.list_checkpoints()
    recommended = _recommended_step(run_dir, [step for step, _ in checkpoints]) if checkpoints else None
    found = [
        folder for step, folder in checkpoints[: max(len(checkpoints) - keep_checkpoints, 0)] if step != recommended
    ]
    if caches:
        found += [folder for folder in (files.latent_cache, files.text_cache) if folder.exists()]
    return found


def remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _recommended_step(run_dir: Path, steps: list[int]) -> int | None:
    try:
        choice = recommend_checkpoint(RunEvidence.from_run_dir(run_dir), steps)
    except (ConfigError, OSError):  # no readable config.yaml: nothing to recommend from, keep the newest only
        return None
    return choice.step if choice else None
