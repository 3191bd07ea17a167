"""Continuing training: a run's own checkpoints (exact resume) and `resume_from` (a previous
run's LoRA as the starting point of a new run)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from training.lora import LoraFileError
from training.run_files import RunFiles
from training.workspace import atomic_write_text, loras_dir, runs_dir


def read_checkpoint_state(folder: Path) -> tuple[Path, dict]:
    """The LoRA file and training state of a checkpoint folder."""
    loras = sorted(folder.glob("*.safetensors"))
    if len(loras) != 1 or not (folder / "training_state.pt").is_file():
        raise LoraFileError(f"checkpoint {folder} is incomplete (needs one .safetensors and training_state.pt)")
    return loras[0], torch.load(folder / "training_state.pt", weights_only=True)


def find_resume_lora(resume_from: str) -> Path:
    """`resume_from` as a LoRA file: a .safetensors path; a run or checkpoint folder; or the
    name of a run in the workspace (its latest attempt) or of a LoRA in loras/."""
    given = Path(resume_from).expanduser()
    looked = [str(given.resolve())]
    if given.is_file():
        return given
    if given.is_dir():
        found = _lora_in_folder(given)
        if found:
            return found
    if "/" not in resume_from and ".." not in resume_from:
        named = loras_dir() / f"{resume_from}.safetensors"
        looked.append(str(named))
        if named.is_file():
            return named
        runs = sorted(
            (p for p in runs_dir().glob(f"{resume_from}*") if p.is_dir() and _run_name(p) == resume_from),
            key=lambda p: p.name,
        )
        looked.append(f"{runs_dir()}/{resume_from}-*")
        for run in reversed(runs):
            found = _lora_in_folder(run)
            if found:
                return found
    raise LoraFileError(f"resume_from {resume_from!r}: no LoRA found (looked in {', '.join(looked)})")


def _run_name(run_dir: Path) -> str:
    """A run folder is <name>-<YYYYmmdd>-<HHMMSS>, or exactly <name>."""
    parts = run_dir.name.rsplit("-", 2)
    return parts[0] if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() else run_dir.name


def _lora_in_folder(folder: Path) -> Path | None:
    """A run's final LoRA, else its latest checkpoint's; a checkpoint folder's own LoRA."""
    files = RunFiles(folder)
    finals = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    if len(finals) == 1:
        return finals[0]
    checkpoints = files.list_checkpoints()
    if checkpoints:
        return read_checkpoint_state(checkpoints[-1][1])[0]
    return None


def truncate_after(files: RunFiles, step: int) -> None:
    """Drop metric and sample rows past `step`: they belong to an attempt that is being redone,
    and the redone steps will write them again."""
    for path in (files.metrics, files.samples_index):
        if not path.exists():
            continue
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed process
            if row.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))
