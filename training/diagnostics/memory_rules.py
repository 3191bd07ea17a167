"""Rules over a run's device memory, each with the config change that fixes it: a GPU spilling into shared system
memory (steps several times slower while its memory is full) and a run that ran out of memory.

Both happen on GPUs only (the spill on Windows, where the NVIDIA driver's "sysmem fallback" lets allocations past
the card's memory succeed in system RAM, read over PCIe), so their tests inject the metrics the rules read. The
trainer runs `spill` on its recent steps as they happen (training/memory_watch.py): the warning in the status,
and the stop of `auto_stop_on: [memory_spill]`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib.util import find_spec
from statistics import median

from training.config import TrainingConfig
from training.diagnostics.evidence import RunEvidence
from training.diagnostics.findings import Finding
from training.estimates import memory_preset_patch, model_family
from training.families.base import ModelFamily

# --- memory spill ------------------------------------------------------------------------------
SPILL_WINDOW = 10  # steps per median: one slow step (a checkpoint save, a bucket of larger images) is no spill
# The recent window's median step time is 3x or more the run's fastest window's: the reports of spills are 3-10x,
# while what else moves a step's time does not reach 2x (buckets hold about the same pixels; samples, validation
# and checkpoints are not in step_time).
SPILL_SLOWDOWN = 3.0
# ... while 90% or more of the device's memory is in use: the driver falls back once dedicated memory runs out,
# and other processes (the desktop, a browser) and the allocator's slack mean the trainer seldom sees 100%.
SPILL_MEMORY_FULL = 0.9


def spill(times: list[float], used_gb: list[float | None], device_gb: float | None) -> dict | None:
    """The numbers of a spill over a run's step times and the device memory in use after each step (GB, None
    where not measured), or None: the last SPILL_WINDOW steps against the fastest earlier window."""
    if not device_gb or len(times) < 2 * SPILL_WINDOW:
        return None
    recent_used = [gb for gb in used_gb[-SPILL_WINDOW:] if gb is not None]
    if not recent_used:
        return None
    recent = median(times[-SPILL_WINDOW:])
    earlier = times[:-SPILL_WINDOW]
    windows = range(0, len(earlier) - SPILL_WINDOW + 1, SPILL_WINDOW)
    fastest = min(median(earlier[i : i + SPILL_WINDOW]) for i in windows)
    used = median(recent_used)
    if fastest <= 0 or recent / fastest < SPILL_SLOWDOWN or used / device_gb < SPILL_MEMORY_FULL:
        return None
    return {
        "seconds_per_step": recent,
        "fastest_seconds_per_step": fastest,
        "slowdown": recent / fastest,
        "memory_used_gb": used,
        "device_memory_gb": device_gb,
    }


def spill_message(facts: dict, step: int) -> str:
    return (
        f"steps take {facts['slowdown']:.1f}x as long as the run's fastest ({facts['seconds_per_step']:.2f} s against "
        f"{facts['fastest_seconds_per_step']:.2f} s, by step {step}) while {facts['memory_used_gb']:.1f} of the GPU's "
        f"{facts['device_memory_gb']:.1f} GB are in use: it is likely spilling into shared system memory, which the "
        "NVIDIA driver does silently on Windows and which makes training 3-10x slower; use the memory preset "
        "(gradient checkpointing, low_vram, batch 1, Adafactor), or set 'CUDA - Sysmem Fallback Policy' to 'Prefer "
        "No Sysmem Fallback' in the NVIDIA Control Panel to get an out-of-memory error instead"
    )


def memory_spill(evidence: RunEvidence) -> Finding | None:
    """Steps 3x slower than the run's fastest while the device's memory is full: a spill to shared memory.
    The fix is the guide's memory preset (training/estimates.py), which `auto_stop_on: [memory_spill]` stops with."""
    rows = [row for row in evidence.train if row.step_time]
    facts = spill([row.step_time for row in rows], [row.memory_gb for row in rows], evidence.device_memory_gb)
    if facts is None:
        return None
    config = evidence.config
    family = model_family(config, evidence.native_resolution, evidence.model_family)
    return Finding(
        rule="memory-spill",
        severity="warning",
        message=spill_message(facts, rows[-1].step) + ".",
        evidence={"step": rows[-1].step, **facts},
        patch=memory_preset_patch(config, family),
    )


# --- out of memory -----------------------------------------------------------------------------
# torch's "CUDA out of memory" / "MPS backend out of memory", and the trainer's own "ran out of device memory"
OUT_OF_MEMORY = re.compile(r"out of (device )?memory", re.IGNORECASE)
# Where the trainer's out-of-memory failure says it happened when it came before the first step
LOADING = "while loading the model and its caches, before step 1"
# The lowest training size an out-of-memory fix lowers `resolution` to: SD 1.5's native 512 px; a real model
# trained below it learns little detail (the guide trains at the native size or a step below it).
OOM_MIN_RESOLUTION = 512
OOM_RESOLUTION_STEP = 256  # 1024 -> 768 px is 44% fewer pixels, and activations scale with the pixels
MAX_ACCUMULATION = 256  # TrainingConfig.gradient_accumulation_steps' upper limit


def out_of_memory_patch(config: TrainingConfig, family: ModelFamily) -> dict:
    """What saves memory at the least cost, as a config patch; a second out-of-memory error, with these applied,
    gets the next step of the ladder. First all that costs no quality: gradient checkpointing (slower steps), batch 1
    with the same effective batch through accumulation, low_vram (the text encoders on the CPU), 8-bit weights
    (FLUX's transformer) or 8-bit AdamW where bitsandbytes is installed; only when none is left, a lower resolution."""
    patch: dict = {}
    if not config.gradient_checkpointing:
        patch["gradient_checkpointing"] = True
    if config.batch_size > 1:
        patch["batch_size"] = 1
        patch["gradient_accumulation_steps"] = min(
            MAX_ACCUMULATION, config.batch_size * config.gradient_accumulation_steps
        )
    if not config.low_vram:
        patch["low_vram"] = True
    if family.hardware_of(config.model_name).quantized and config.quantize_base == "none":
        patch["quantize_base"] = "8bit"
    elif config.optimizer == "adamw" and find_spec("bitsandbytes") is not None:
        patch["optimizer"] = "adamw8bit"
    if not patch and config.resolution and config.resolution > OOM_MIN_RESOLUTION:
        patch["resolution"] = max(OOM_MIN_RESOLUTION, config.resolution - OOM_RESOLUTION_STEP)
    return patch


def describe_patch(patch: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in patch.items())


def out_of_memory(evidence: RunEvidence) -> Finding | None:
    """The run failed out of device memory. The trainer saved a checkpoint at the last whole step (where it could),
    so resume-training with apply_fix continues from there with the patch."""
    if evidence.state != "failed" or not evidence.error or not OUT_OF_MEMORY.search(evidence.error):
        return None
    config = evidence.config
    patch = out_of_memory_patch(config, model_family(config, evidence.native_resolution, evidence.model_family))
    step = re.search(r"at step (\d+)", evidence.error)
    where = f" at step {step.group(1)}" if step else f" {LOADING}" if LOADING in evidence.error else ""
    memory = f" ({evidence.device_memory_gb:.1f} GB)" if evidence.device_memory_gb else ""
    fix = (
        f"continue it with less memory: {describe_patch(patch)} (resume-training with apply_fix out-of-memory "
        "continues from the last checkpoint with these)"
        if patch
        else "nothing is left to lower in the config at this resolution: use a GPU with more memory"
    )
    return Finding(
        rule="out-of-memory",
        severity="error",
        message=f"the run ran out of device memory{memory}{where}: {fix}.",
        evidence={
            "error": evidence.error,
            "step": int(step.group(1)) if step else None,
            "device_memory_gb": evidence.device_memory_gb,
        },
        patch=patch,
    )


MEMORY_RULES: list[Callable[[RunEvidence], Finding | None]] = [out_of_memory, memory_spill]
