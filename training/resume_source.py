"""Which LoRA `resume_from` names: found without torch, so that the server can check a config before its run
starts (validate-training-config) and the trainer finds the same file when it does."""

from __future__ import annotations

import re
from pathlib import Path

from training.config import TrainingConfig
from training.run_files import RunFiles
from training.workspace import loras_dir, runs_dir

# <name>-<YYYYmmdd>-<HHMMSS> (lora-train's run folders) or <name>-<YYYYmmdd>-<HHMMSS>-<4 hex> (the server's
# job ids, whose random tail keeps two jobs started in the same second apart).
_RUN_FOLDER = re.compile(r"^(?P<name>.+)-\d{8}-\d{6}(?:-[0-9a-f]{4})?$")


class ResumeSourceError(ValueError):
    """`resume_from` names no LoRA; the message says where it looked and what to give instead."""


def find_resume_lora(resume_from: str, relative_to: Path | None = None) -> Path:
    """`resume_from` as a LoRA file: a .safetensors path; a run or checkpoint folder; or the name of a run in
    the workspace (its latest run that left a LoRA) or of a LoRA in loras/. A relative path is taken from
    `relative_to` (the working directory when None)."""
    given = Path(resume_from).expanduser()
    if relative_to is not None and not given.is_absolute():
        given = relative_to / given
    looked = [str(given.resolve())]
    if given.is_file():
        return given
    if given.is_dir():
        found = _lora_in_folder(given)
        if found:
            return found
    if "/" not in resume_from and "\\" not in resume_from and ".." not in resume_from:
        named = loras_dir() / f"{resume_from}.safetensors"
        looked.append(str(named))
        if named.is_file():
            return named
        runs = sorted(
            (p for p in runs_dir().glob(f"{resume_from}*") if p.is_dir() and run_name(p) == resume_from),
            key=lambda p: p.name,  # the timestamp in the name: oldest first
        )
        looked.append(f"{runs_dir()}/{resume_from}-<date>-<time>[-<id>]")
        for run in reversed(runs):
            found = _lora_in_folder(run)
            if found:
                return found
    raise ResumeSourceError(
        f"resume_from {resume_from!r}: no LoRA found (looked in {', '.join(looked)}). Give the name of a config "
        "whose run has completed (or saved a checkpoint), a LoRA in loras/ by its name, a run folder or a "
        ".safetensors file; train that config first (start-training), or remove resume_from to start afresh"
    )


# What an exact resume cannot change, and why: it continues the checkpoint's LoRA, optimizer state and data
# position as they are.
RESUME_FIXED = {
    "rank": "its LoRA and optimizer state have that rank's shapes",
    "alpha": "alpha scales what its LoRA learned",
    "model_name": "its LoRA was learned on that model",
    "dataset_path": "its data position counts that dataset's images",
}


def resume_conflicts(config: TrainingConfig, run_dir: Path) -> list[str]:
    """How `config` differs from the run's latest checkpoint in what an exact resume cannot change, one line
    each naming both values and what to do; empty when it has no checkpoint (or one without its config). Other
    options (steps, learning rate, batch, resolution, precision) may change between a stop and its resume."""
    checkpoints = RunFiles(run_dir).list_checkpoints()
    saved = checkpoints[-1][1] / "config.yaml" if checkpoints else None
    if saved is None or not saved.is_file():
        return []
    before = TrainingConfig.load(saved)
    return [
        f"{field} is {_resolved(config, field)!r} but checkpoint {saved.parent.name} was trained with "
        f"{_resolved(before, field)!r} ({why}): set {field} back to {_resolved(before, field)!r} in "
        f"{run_dir / 'config.yaml'} to resume, or start a new run with resume_from: {saved.parent} (it starts from "
        "that LoRA and zero-pads a smaller rank to the new one)"
        for field, why in RESUME_FIXED.items()
        if _resolved(config, field) != _resolved(before, field)
    ]


def _resolved(config: TrainingConfig, field: str):
    """The value the LoRA is trained with: kohya's network_dim / network_alpha where given, and alpha None is the
    rank (so alpha None against alpha 16 at rank 16 is no change)."""
    resolved = {"rank": config.effective_rank, "alpha": config.effective_alpha}
    return resolved[field] if field in resolved else getattr(config, field)


def run_name(run_dir: Path) -> str:
    """The config name of a run folder: <name>-<YYYYmmdd>-<HHMMSS>[-<4 hex>], or exactly <name>."""
    match = _RUN_FOLDER.match(run_dir.name)
    return match.group("name") if match else run_dir.name


def checkpoint_lora(folder: Path) -> Path | None:
    """A complete checkpoint folder's LoRA file (one .safetensors beside training_state.pt), else None."""
    loras = sorted(folder.glob("*.safetensors"))
    return loras[0] if len(loras) == 1 and (folder / "training_state.pt").is_file() else None


def _lora_in_folder(folder: Path) -> Path | None:
    """A run's final LoRA, else its latest checkpoint's; a checkpoint folder's own LoRA."""
    finals = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    if len(finals) == 1:
        return finals[0]
    checkpoints = RunFiles(folder).list_checkpoints()
    return checkpoint_lora(checkpoints[-1][1]) if checkpoints else None
