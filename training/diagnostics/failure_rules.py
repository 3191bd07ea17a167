"""Rules for the failures users report most with LoRA trainers, each read from what the run recorded and each
with its fix: broken sample images (black, flat or NaN), sampling abandoned past sample_timeout_s, and a loss
that collapses to near zero early (memorising).

Like the rules of training_rules.py, each takes a RunEvidence and returns one Finding or None.
"""

from __future__ import annotations

from collections.abc import Callable
from statistics import mean

from training.diagnostics.evidence import RunEvidence, SampleRow
from training.diagnostics.findings import Finding
from training.diagnostics.patches import DROPOUT_AGAINST_COPYING, lr_patch
from training.guide import GUIDE_LOSS_TARGET

# --- broken samples ----------------------------------------------------------------------------
BLACK_MEAN = 0.02  # brightness (0-1) below 2%: NaN pixels are saved as 0; a night photo still averages 0.1-0.2
FLAT_CONTRAST = 0.01  # luminance spread (0-0.5) below 1%: one colour edge to edge; photos and drawings are 0.1-0.3


def _broken(row: SampleRow) -> str | None:
    """What is wrong with a sample image: 'non-finite', 'black', 'flat', or None."""
    if row.non_finite:
        return "non-finite"
    if row.mean is not None and row.mean < BLACK_MEAN:
        return "black"
    if row.contrast is not None and row.contrast < FLAT_CONTRAST:
        return "flat"
    return None


def broken_samples(evidence: RunEvidence) -> Finding | None:
    """The latest samples are black, one flat colour, or decoded from NaN/infinite values. The reports' usual
    cause is an fp16 overflow: an SD/SDXL VAE decoding in fp16 (this trainer keeps the VAE fp32 under fp16, so
    here the denoiser's fp16 activations), fixed by bf16, whose range is fp32's, or by fp32 on a device without
    fast bf16 (a T4, a GeForce 10xx/20xx, a CPU). Broken at step 0 under bf16, it is the base model decoding in
    bf16 (its VAE is stored in bf16 too): fp32 all through. Broken at step 0 in fp32, the base model's own files
    are at fault, which no config option mends: the finding says so with no patch. Broken only later under bf16 or
    fp32, the LoRA's weights have blown up."""
    latest = max((row.step for row in evidence.samples), default=None)
    rows = [row for row in evidence.samples if row.step == latest]
    broken = {row.file: kind for row in rows if (kind := _broken(row))}
    if not broken:
        return None
    config = evidence.config
    first = min(row.step for row in evidence.samples if _broken(row))
    cause, patch = _broken_cause(evidence, first)
    kinds = sorted(set(broken.values()))
    return Finding(
        rule="broken-samples",
        severity="warning",
        message=f"{len(broken)} of the {len(rows)} samples at step {latest} are {' or '.join(kinds)} (first seen at "
        f"step {first}): likely {cause}.",
        evidence={"step": latest, "first_step": first, "broken": broken, "mixed_precision": config.mixed_precision},
        patch=patch,
    )


def _broken_cause(evidence: RunEvidence, first: int) -> tuple[str, dict]:
    """The likely cause of broken samples first seen at step `first`, and its fix as a patch."""
    config, bf16_native = evidence.config, evidence.bf16_native
    if config.mixed_precision == "fp16" and bf16_native is False:
        return "fp16 overflowing while sampling, on a device without fast bf16: train in fp32 instead", {
            "mixed_precision": "no"
        }
    if config.mixed_precision == "fp16":
        return "fp16 overflowing while sampling: train in bf16 (fp32's range) instead", {"mixed_precision": "bf16"}
    if first == 0 and config.mixed_precision == "bf16":
        return (
            "the base model decoding in bf16 before any training (its VAE is stored in bf16 too): train in fp32, "
            "or use an fp32-safe VAE (the fp16-fix VAE for SDXL)",
            {"mixed_precision": "no"},
        )
    if first == 0:
        return (
            "the base model's own samples were broken before any training, in fp32: its files are damaged or its VAE "
            "is broken; download the model again or use a known-good VAE (no config change mends it)",
            {},
        )
    return (
        f"the LoRA's weights have blown up: lower the learning rate (from a checkpoint before step {first})",
        lr_patch(config, 0.5),
    )


# --- sampling past its time limit --------------------------------------------------------------
SAMPLE_STEPS_FLOOR = 10  # fewer denoising steps blur the samples too much to judge a LoRA by


def sampling_timeout(evidence: RunEvidence) -> Finding | None:
    """Rounds of samples the trainer abandoned past sample_timeout_s (training went on without them). Sampling
    that slow is mostly memory spilled into shared system memory or a sampler too heavy for the card: fewer
    denoising steps (down to 10) first, else a longer limit."""
    timeouts = evidence.sample_timeouts
    if not timeouts:
        return None
    latest, config = timeouts[-1], evidence.config
    if config.sample_steps > SAMPLE_STEPS_FLOOR:
        patch = {"sample_steps": max(SAMPLE_STEPS_FLOOR, config.sample_steps // 2)}
    else:
        patch = {"sample_timeout_s": 2 * latest.limit}
    return Finding(
        rule="sampling-timeout",
        severity="warning",
        message=f"sampling was abandoned {len(timeouts)} time(s) past sample_timeout_s {latest.limit:g} s (latest: "
        f"step {latest.step}, {latest.rendered} of {latest.prompts} images after {latest.seconds:.0f} s); training "
        "went on without those samples. Check that GPU memory is not spilling into shared system memory, and "
        "render fewer denoising steps or allow more time.",
        evidence={"timeouts": [row.model_dump() for row in timeouts[-10:]], "count": len(timeouts)},
        patch=patch,
    )


# --- a loss that collapses early ---------------------------------------------------------------
NEAR_ZERO_LOSS = GUIDE_LOSS_TARGET[0] / 5  # 0.01: a fifth of the guide's healthy floor 0.05
EARLY_SHARE = 0.1  # within the first tenth of config.steps
COLLAPSE_WINDOW = 10  # mean of 10 consecutive steps: one step at a high noise level can score near 0 on its own


def loss_collapsed_early(evidence: RunEvidence) -> Finding | None:
    """The training loss averaged under 0.01 over 10 steps within the first tenth of the run. A denoising loss
    stays well above that while the model must guess the image under the noise (the guide's healthy band is
    0.05-0.15); near 0 it knows the images exactly: it is memorising them, usually too high a learning rate on
    too few images, and the rest of the run only overfits further."""
    config, rows = evidence.config, evidence.train
    if not config.steps:
        return None
    early = [row for row in rows if row.step <= EARLY_SHARE * config.steps]
    for end in range(COLLAPSE_WINDOW, len(early) + 1):
        window = early[end - COLLAPSE_WINDOW : end]
        level = mean(row.loss for row in window)
        if level < NEAR_ZERO_LOSS:
            break
    else:
        return None
    step = window[-1].step
    patch = lr_patch(config, 0.5)
    if config.dropout < DROPOUT_AGAINST_COPYING:
        patch["dropout"] = DROPOUT_AGAINST_COPYING
    images = f" on {evidence.images} images" if evidence.images else ""
    return Finding(
        rule="loss-collapsed-early",
        severity="warning",
        message=f"the loss fell to {level:.2g} (mean of {COLLAPSE_WINDOW} steps) by step {step} of {config.steps}"
        f"{images}, under {NEAR_ZERO_LOSS:g} within the first tenth of the run: the LoRA is memorising its training "
        "images rather than learning the concept; lower the learning rate, add dropout, and use more (or more "
        "varied) images or prior preservation.",
        evidence={"step": step, "loss": level, "first_loss": mean(row.loss for row in rows[:COLLAPSE_WINDOW])},
        patch=patch,
    )


FAILURE_RULES: list[Callable[[RunEvidence], Finding | None]] = [broken_samples, sampling_timeout, loss_collapsed_early]
