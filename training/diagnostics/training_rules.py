"""Live training rules: the guide's troubleshooting advice checked against what a run recorded.

Each rule reads a RunEvidence (loss rows, validation rows, LoRA update sizes, sample statistics,
the run's state) and returns one Finding or None when there is nothing to report or too little data.
Per-step diffusion loss is noisy (each step draws its own timesteps), so the rules compare medians
and block means over windows, never single steps, except `loss_spike`, whose job is single steps.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from statistics import linear_regression, mean, median, variance

from training.diagnostics.checkpoints import COPY_DISTANCE, NO_EFFECT_DISTANCE
from training.diagnostics.evidence import RunEvidence, SampleRow
from training.diagnostics.findings import Finding
from training.diagnostics.patches import (
    DROPOUT_AGAINST_COPYING,
    DROPOUT_AGAINST_OVERFITTING,
    bleeding_patch,
    dropout_patch,
    lr_patch,
    no_effect_patch,
)
from training.diagnostics.trend import fit_trend
from training.guide import CONSERVATIVE_LEARNING_RATE, GUIDE_LOSS_TARGET

MIN_ROWS = 20  # training rows before any loss rule speaks: fewer is mostly warm-up and noise


# --- shared helpers ----------------------------------------------------------------------------
def _losses(evidence: RunEvidence) -> list[float]:
    return [row.loss for row in evidence.train]


def _recent_median(values: list[float], window: int = MIN_ROWS) -> float:
    """The smoothed latest value: the median of the last `window` values (robust to single spikes)."""
    return median(values[-window:])


def _per_step_mean(samples: list[SampleRow], field: str, *, control: bool) -> dict[int, float]:
    """{step: mean of `field`} over the trigger (control=False) or control samples after step 0."""
    by_step: dict[int, list[float]] = {}
    for row in samples:
        value = getattr(row, field)
        if row.control == control and row.step > 0 and value is not None:
            by_step.setdefault(row.step, []).append(value)
    return {step: mean(values) for step, values in sorted(by_step.items())}


def format_duration(seconds: float) -> str:
    """'45s', '12m 05s', '3h 20m': the time left in a finding and in the dashboard's summary."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


# --- loss rules --------------------------------------------------------------------------------
SPIKE_RATIO = 3.0  # a spike is > 3x the median of the previous 20 steps ...
SPIKE_MADS = 6.0  # ... and > 6 robust standard deviations (1.4826 x MAD) of log-loss above it, ...
SPIKE_SPREAD_STEPS = 100  # ... the spread measured over up to 100 previous steps (20 give too noisy a MAD)


def loss_spike(evidence: RunEvidence) -> Finding | None:
    """Single steps far above the 20 steps before them. The guide: "Sudden spike -> Check for corrupt data",
    so the finding names each spike's batch files. Diffusion loss is heavy-tailed, so the ratio alone fires on
    ordinary noise: a spike must also be an outlier of the log-loss, whose spread grows with the run's noise
    (on seeded log-normal noise of sigma 0.1-1.0 this found no spike in 50,000 steps)."""
    rows = evidence.train
    if len(rows) <= MIN_ROWS:
        return None
    logs = [math.log(max(row.loss, 1e-12)) for row in rows]
    spikes = []
    for i in range(MIN_ROWS, len(rows)):
        level = median(row.loss for row in rows[i - MIN_ROWS : i])
        history = logs[max(0, i - SPIKE_SPREAD_STEPS) : i]
        center = median(history)  # once per step, not once per element: 4.7 s -> 0.35 s on 10,000 steps
        spread = 1.4826 * median(abs(x - center) for x in history)
        if rows[i].loss > SPIKE_RATIO * level and logs[i] > math.log(level) + SPIKE_MADS * spread:
            spikes.append({"step": rows[i].step, "loss": rows[i].loss, "median": level, "files": rows[i].files})
    if not spikes:
        return None
    worst = max(spikes, key=lambda s: s["loss"] / s["median"])
    files = f" ({', '.join(worst['files'])})" if worst["files"] else ""
    return Finding(
        rule="loss-spike",
        severity="warning",
        message=f"loss jumped to {worst['loss']:.3g} at step {worst['step']}, {worst['loss'] / worst['median']:.1f}x "
        f"the median of the 20 steps before ({len(spikes)} such step(s)): check that batch's images{files} for "
        "corrupt or mislabelled data.",
        evidence={"spikes": spikes[:10], "count": len(spikes), "worst_step": worst["step"]},
    )


PLATEAU_MIN_GAIN = 0.02  # the fitted loss fell less than 2% over the latest quarter of the record ...
PLATEAU_EARLY = 0.5  # ... while under half of config.steps are done (later, a flat loss is expected) ...
PLATEAU_MIN_GAIN_SINCE_START = 0.05  # ... or less than 5% over the last three quarters together ...
PLATEAU_PRIOR_DROP = 0.05  # ... after the first half fell 5% or more, beyond noise (trend.TREND_Z)
PLATEAU_MAX_RISE = 0.10  # a loss rising more than 10% is not a plateau: raising lr would make it worse
PLATEAU_LR_FACTOR = 1.5


def plateau_early(evidence: RunEvidence) -> Finding | None:
    """The loss fell, then stopped falling early, above the guide's target band. The guide: "Plateaued early ->
    Increase learning rate". With held-out images the validation loss decides (scored at fixed noise levels,
    its changes are the LoRA's). Else the trend of the training loss (trend.py): a fall beyond noise in the
    first half, then a latest quarter that no longer falls. A healthy diffusion loss is often flat from the
    start (it mostly tracks the noise levels drawn; FLUX's always is): never seen to fall, it is flat, not
    stalled, and the no-effect rule judges whether that LoRA learns. Early: under half done, or no fall since
    the first quarter. An oscillating or exploding run stops improving too, but there a higher lr makes it
    worse: those rules report it instead."""
    if evidence.validation:
        return _validation_plateau(evidence)
    losses = _losses(evidence)
    if len(losses) < 2 * MIN_ROWS or oscillation(evidence) or gradient_exploding(evidence):
        return None
    q = len(losses) // 4
    first_half, latest, since_start = fit_trend(losses[: 2 * q]), fit_trend(losses[3 * q :]), fit_trend(losses[q:])
    last, flow = median(losses[3 * q :]), _flow_matching(evidence)
    steps = evidence.config.steps
    progress = evidence.train[-1].step / steps if steps else None
    early = (progress is not None and progress < PLATEAU_EARLY) or (
        since_start.drop < PLATEAU_MIN_GAIN_SINCE_START and not since_start.falling
    )
    fell = first_half.falling and first_half.drop >= PLATEAU_PRIOR_DROP
    stalled = -PLATEAU_MAX_RISE <= latest.drop < PLATEAU_MIN_GAIN and not latest.falling
    if not (fell and stalled and early) or (last <= GUIDE_LOSS_TARGET[1] and not flow):
        return None
    # FLUX's velocity loss sits above the guide's band by nature (see loss_target): its level says nothing.
    level = "" if flow else f" (above the guide's {GUIDE_LOSS_TARGET[1]:g})"
    return _plateau_finding(
        evidence,
        f"the loss fell {first_half.drop:.0%} in the first half of the record, then stalled at {last:.3g}{level}",
        {
            "step": evidence.train[-1].step,
            "progress": progress,
            "first_half_drop": first_half.drop,
            "latest_quarter_drop": latest.drop,
            "latest_quarter_trend_z": latest.z,
            "latest_quarter_median": last,
        },
    )


PLATEAU_VALIDATION_CHECKS = 4  # validation scores the plateau rule needs: step 0 and three more


def _validation_plateau(evidence: RunEvidence) -> Finding | None:
    """The held-out loss (fixed noise levels, so its changes are the LoRA's) improved less than 2% over
    its last two checks while the run is under half done; before its fourth check, nothing is said."""
    scores = evidence.validation
    steps = evidence.config.steps
    if len(scores) < PLATEAU_VALIDATION_CHECKS or not steps:
        return None
    before, last = scores[-3].loss, scores[-1].loss
    gain, progress = (before - last) / before, scores[-1].step / steps
    if gain >= PLATEAU_MIN_GAIN or gain < -PLATEAU_MAX_RISE or progress >= PLATEAU_EARLY:
        return None
    return _plateau_finding(
        evidence,
        f"the validation loss has stalled at {last:.3g} (from {before:.3g} two checks before)",
        {"step": scores[-1].step, "progress": progress, "validation_before": before, "validation_latest": last},
    )


def _plateau_finding(evidence: RunEvidence, stalled: str, facts: dict) -> Finding:
    patch = lr_patch(evidence.config, PLATEAU_LR_FACTOR)
    fix = "raise learning_rate" if patch else "learning_rate cannot go higher here: try a larger rank"
    return Finding(
        rule="loss-plateau",
        severity="warning",
        message=f"{stalled} by step {facts['step']}: it plateaued early, {fix}.",
        evidence=facts,
        patch=patch,
    )


OSC_BLOCKS = 10  # the recent window is cut into 10 blocks; their means are the smoothed curve
OSC_VARIANCE_RATIO = 4.0  # block means vary > 4x what independent per-step noise explains (iid noise: ~1)
OSC_AMPLITUDE = 0.10  # ... by more than +-10% of the loss level around the trend
OSC_CROSSINGS = 3  # ... crossing the trend at least 3 times (1.5 swings; a single jump crosses once)
OSC_MAX_DROP = 0.10  # ... while the trend falls less than 10% over the window


def oscillation(evidence: RunEvidence) -> Finding | None:
    """Loss swinging up and down with a large amplitude and no downward trend. The guide: "Oscillating ->
    Decrease learning rate". Per-step noise must not count: the detrended block means' variance is compared
    with within-block variance / block size, what independent noise gives; a real swing makes it large."""
    losses = _losses(evidence)
    if len(losses) < 2 * MIN_ROWS:
        return None
    recent = losses[-max(2 * MIN_ROWS, len(losses) // 2) :]
    size = len(recent) // OSC_BLOCKS
    blocks = [recent[i * size : (i + 1) * size] for i in range(OSC_BLOCKS)]
    means = [mean(block) for block in blocks]
    slope, intercept = linear_regression(range(OSC_BLOCKS), means)
    residuals = [y - (intercept + slope * x) for x, y in enumerate(means)]
    noise = mean(variance(block) for block in blocks) / size
    ratio = variance(residuals) / noise if noise > 0 else float("inf")
    amplitude = variance(residuals) ** 0.5 / median(recent)
    crossings = sum(a * b < 0 for a, b in zip(residuals, residuals[1:]))
    drop = -slope * (OSC_BLOCKS - 1) / mean(means)
    if ratio <= OSC_VARIANCE_RATIO or amplitude <= OSC_AMPLITUDE or crossings < OSC_CROSSINGS or drop >= OSC_MAX_DROP:
        return None
    return Finding(
        rule="loss-oscillation",
        severity="warning",
        message=f"the loss swings by about +-{amplitude:.0%} of its level over the last {len(recent)} steps "
        "without going down: the learning rate is likely too high, lower it.",
        evidence={
            "steps": [evidence.train[-len(recent)].step, evidence.train[-1].step],
            "block_means": means,
            "amplitude": amplitude,
            "variance_ratio": ratio,
            "trend_crossings": crossings,
            "trend_drop": drop,
        },
        patch=lr_patch(evidence.config, 0.5),
    )


VAL_RISE = 0.10  # latest validation loss >= 10% above its minimum ...
VAL_ROWS_AFTER_BEST = 2  # ... with at least 2 validation rows after the minimum (one could be noise)


def overfitting_divergence(evidence: RunEvidence) -> Finding | None:
    """Validation loss rising while the training loss keeps falling: the LoRA learns its training images
    rather than the concept (overfitting). The best validation step is where the run should have stopped."""
    rows = evidence.validation
    best = min(rows, key=lambda row: row.loss, default=None)
    if best is None or len([row for row in rows if row.step > best.step]) < VAL_ROWS_AFTER_BEST:
        return None
    latest = rows[-1]
    rise = (latest.loss - best.loss) / best.loss
    after = [row.loss for row in evidence.train if row.step > best.step]
    before = [row.loss for row in evidence.train if row.step <= best.step][-len(after) :] if after else []
    if rise < VAL_RISE or len(after) < 5 or not before or median(after) >= median(before):
        return None
    patch = {"steps": max(1, best.step)} | dropout_patch(evidence.config, DROPOUT_AGAINST_OVERFITTING)
    return Finding(
        rule="validation-divergence",
        severity="warning",
        message=f"validation loss rose {rise:.0%} from its best {best.loss:.3g} at step {best.step} to "
        f"{latest.loss:.3g} at step {latest.step} while the training loss kept falling: the LoRA is overfitting; "
        "stop at the best step, and per the guide lower the learning rate, add dropout 0.1-0.3, use more "
        "diverse captions or enable prior preservation.",
        evidence={
            "best_step": best.step,
            "best_loss": best.loss,
            "latest_step": latest.step,
            "latest_loss": latest.loss,
            "rise": rise,
            "train_loss_before_best": median(before),
            "train_loss_after_best": median(after),
        },
        patch=patch,
    )


# --- sample and update rules -------------------------------------------------------------------
NO_EFFECT_UPDATE = 1e-4  # ||BA|| / ||W|| below 1e-4: the LoRA has moved the weights by a hundredth of a percent
NO_EFFECT_MIN_PROGRESS = 0.1  # judged from 10% of config.steps on: a LoRA starts at zero and needs steps


def no_effect(evidence: RunEvidence) -> Finding | None:
    """The LoRA changes nothing: the trigger samples still match their step-0 images and/or its update is a
    negligible fraction of the weights; every kind of evidence present must agree. The guide's underfitting
    advice: increase the learning rate, train longer, increase rank, check the trigger word."""
    config = evidence.config
    earliest = max(1, NO_EFFECT_MIN_PROGRESS * config.steps) if config.steps else 1
    distances = _per_step_mean(evidence.samples, "baseline_distance", control=False)
    updates = [row for row in evidence.updates if row.step >= earliest]
    facts, seen = {}, []
    if distances and max(distances) >= earliest:
        step = max(distances)
        facts.update(sample_step=step, baseline_distance=distances[step])
        seen.append(f"the trigger samples differ by {distances[step]:.3g} from step 0 at step {step}")
        if distances[step] >= NO_EFFECT_DISTANCE:
            return None
    if updates:
        facts.update(update_step=updates[-1].step, mean_update_ratio=updates[-1].mean_ratio)
        seen.append(f"its update is {updates[-1].mean_ratio:.2g} of the weights")
        if updates[-1].mean_ratio >= NO_EFFECT_UPDATE:
            return None
    if not facts:
        return None
    return Finding(
        rule="no-effect",
        severity="warning",
        message=f"the LoRA has no visible effect ({'; '.join(seen)}): raise the learning rate, train longer or "
        "raise rank, and check the trigger word is in the captions and the test prompts.",
        evidence=facts,
        patch=no_effect_patch(config),
    )


def sample_collapse(evidence: RunEvidence) -> Finding | None:
    """The trigger samples are turning into copies of training images: their distance to the nearest
    training image is small and still falling. The guide's overfitting: "LoRA only generates training
    images". The steps patch stops at the last sampled step before the samples came that close."""
    nearest = _per_step_mean(evidence.samples, "nearest_training_distance", control=False)
    steps = list(nearest)
    if len(steps) < 2 or nearest[steps[-1]] >= COPY_DISTANCE or nearest[steps[-1]] >= nearest[steps[-2]]:
        return None
    first_close = len(steps) - 1
    while first_close > 0 and nearest[steps[first_close - 1]] < COPY_DISTANCE:
        first_close -= 1
    patch = dropout_patch(evidence.config, DROPOUT_AGAINST_COPYING)
    if first_close > 0:
        patch["steps"] = steps[first_close - 1]
    latest = [r.file for r in evidence.samples if r.step == steps[-1] and not r.control]
    return Finding(
        rule="samples-copy-training-images",
        severity="warning",
        message=f"the trigger samples are within {nearest[steps[-1]]:.3f} of training images by step {steps[-1]} "
        "and getting closer: the LoRA is memorising them; train fewer steps with dropout, and use more diverse "
        "captions or prior preservation.",
        evidence={"nearest_training_distance": nearest, "collapse_step": steps[first_close], "samples": latest},
        patch=patch,
    )


BLEED_DISTANCE = 0.08  # control samples moved > 0.08 from their step-0 image ...
BLEED_SHARE = 0.5  # ... and by more than half as much as the trigger samples moved


def style_bleeding(evidence: RunEvidence) -> Finding | None:
    """The control prompt (no trigger word) changes too: the LoRA affects more than its trigger. The guide:
    caption specificity, regularisation images (prior preservation, patched on only where a class_prompt
    makes that valid), a lower strength when using it, a narrower focus."""
    control = _per_step_mean(evidence.samples, "baseline_distance", control=True)
    trigger = _per_step_mean(evidence.samples, "baseline_distance", control=False)
    step = max(control, default=None)
    if step is None or step not in trigger:
        return None
    if control[step] <= BLEED_DISTANCE or control[step] <= BLEED_SHARE * trigger[step]:
        return None
    return Finding(
        rule="style-bleeding",
        severity="warning",
        message=f"the control prompt's samples moved {control[step]:.3f} from step 0 by step {step} "
        f"(the trigger samples moved {trigger[step]:.3f}): the LoRA bleeds into "
        "prompts without the trigger word; make captions more specific, use regularisation images, narrow the "
        "focus, or use it at a lower strength.",
        evidence={"step": step, "control_distance": control[step], "trigger_distance": trigger[step]},
        patch=bleeding_patch(evidence.config),
    )


# --- gradient rules ----------------------------------------------------------------------------
EXPLODE_GROWTH = 10.0  # recent median grad_norm > 10x the early median ...
EXPLODE_ABSOLUTE = 1e3  # ... or any grad_norm above 1e3 (LoRA norms are usually well under 10) ...
EXPLODE_SKIPPED = 0.25  # ... or over a quarter of recent steps skipped by the fp16 scaler (grad_norm None)
VANISH_NORM = 1e-7  # recent median grad_norm below 1e-7: nothing reaches the LoRA


def _grad_windows(evidence: RunEvidence) -> tuple[list, list] | None:
    """The first and last fifth (at least 10 rows each) of the grad_norm record, None without enough rows."""
    rows = evidence.train
    if len(rows) < MIN_ROWS:
        return None
    size = max(MIN_ROWS // 2, len(rows) // 5)
    return [r.grad_norm for r in rows[:size]], [r.grad_norm for r in rows[-size:]]


def gradient_exploding(evidence: RunEvidence) -> Finding | None:
    """Gradient norms growing by an order of magnitude, reaching huge values, or overflowing fp16 often.
    The guide: "Gradient norm: Stable (not exploding)". Lower the learning rate and keep clipping on."""
    windows = _grad_windows(evidence)
    if windows is None:
        return None
    early = median([g for g in windows[0] if g is not None] or [0.0])
    recent = median([g for g in windows[1] if g is not None] or [0.0])
    peak, peak_step = max(
        ((r.grad_norm, r.step) for r in evidence.train if r.grad_norm is not None), default=(0.0, None)
    )
    skipped = windows[1].count(None) / len(windows[1])
    growth = recent / early if early > 0 else 0.0
    reasons = {
        f"the recent median {recent:.3g} is {growth:.0f}x the early {early:.3g}": growth > EXPLODE_GROWTH,
        f"it reached {peak:.3g} at step {peak_step}": peak > EXPLODE_ABSOLUTE,
        f"{skipped:.0%} of recent steps overflowed fp16": skipped > EXPLODE_SKIPPED,
    }
    seen = [reason for reason, found in reasons.items() if found]
    if not seen:
        return None
    patch = lr_patch(evidence.config, 0.5)
    if evidence.config.max_grad_norm == 0:
        patch["max_grad_norm"] = 1.0
    return Finding(
        rule="gradient-exploding",
        severity="warning",
        message=f"gradient norms are exploding ({'; '.join(seen)}): lower the learning rate and keep gradient "
        "clipping on.",
        evidence={
            "early_median": early,
            "recent_median": recent,
            "peak": peak,
            "peak_step": peak_step,
            "skipped": skipped,
        },
        patch=patch,
    )


def gradient_vanishing(evidence: RunEvidence) -> Finding | None:
    """Gradient norms near zero while the loss does not improve: the LoRA receives no signal (too low a
    learning rate with a decaying schedule, or a broken setup). The loss check uses the same 2% as the
    plateau rule, comparing the first and last fifths."""
    windows = _grad_windows(evidence)
    recent = [g for g in windows[1] if g is not None] if windows else []
    if not recent or median(recent) >= VANISH_NORM:
        return None
    losses = _losses(evidence)
    size = len(windows[1])
    before, after = median(losses[:size]), median(losses[-size:])
    if (before - after) / before >= PLATEAU_MIN_GAIN:
        return None
    return Finding(
        rule="gradient-vanishing",
        severity="warning",
        message=f"gradient norms have vanished (recent median {median(recent):.2g}) and the loss is not improving: "
        "the LoRA gets no training signal; raise the learning rate and check the lr schedule has not decayed to 0.",
        evidence={"recent_median": median(recent), "early_loss": before, "recent_loss": after},
        patch=lr_patch(evidence.config, 2.0),
    )


# --- run-level rules ---------------------------------------------------------------------------
NON_FINITE = re.compile(r"non-finite|\bnan\b|\binf\b", re.IGNORECASE)  # the trainer: "the loss became nan ..."


def non_finite_loss(evidence: RunEvidence) -> Finding | None:
    """The run failed because the loss became NaN or infinite: training cannot continue from there. Resume
    from the last good checkpoint with the guide's conservative learning rate (or half the current one
    where that is already lower), clipping on, and fp32 where fp16 overflowed."""
    if evidence.state != "failed" or not evidence.error or not NON_FINITE.search(evidence.error):
        return None
    config = evidence.config
    patch: dict = {}
    if config.optimizer != "prodigy":
        patch["learning_rate"] = min(CONSERVATIVE_LEARNING_RATE, config.learning_rate / 2)
    if config.max_grad_norm == 0:
        patch["max_grad_norm"] = 1.0
    if config.mixed_precision == "fp16":
        patch["mixed_precision"] = "no"
    step = re.search(r"at step (\d+)", evidence.error)
    return Finding(
        rule="non-finite-loss",
        severity="error",
        message="the run stopped because the loss became NaN or infinite: resume from the last checkpoint with a "
        "lower learning rate and gradient clipping on, and check the images of the failing batch.",
        evidence={"error": evidence.error, "step": int(step.group(1)) if step else None},
        patch=patch,
    )


def loss_target(evidence: RunEvidence) -> Finding | None:
    """Where the smoothed latest loss (median of the last 20 steps) sits against the guide's 0.05-0.15.
    Information only: the level depends on the model, its prediction type and the data."""
    losses = _losses(evidence)
    if len(losses) < MIN_ROWS:
        return None
    level, (low, high) = _recent_median(losses), GUIDE_LOSS_TARGET
    if _flow_matching(evidence):
        return Finding(
            rule="loss-target",
            severity="info",
            message=f"the smoothed loss is {level:.3g} at step {evidence.train[-1].step}. The guide's target "
            f"{low:g}-{high:g} describes noise-prediction (SD) losses; FLUX learns the velocity noise - image, "
            "whose loss sits higher and depends on the noise levels drawn: judge a FLUX run by the trend of its "
            "validation loss and its samples.",
            evidence={
                "step": evidence.train[-1].step,
                "smoothed_loss": level,
                "target": [low, high],
                "position": "n/a",
            },
        )
    where = "below" if level < low else "above" if level > high else "within"
    return Finding(
        rule="loss-target",
        severity="info",
        message=f"the smoothed loss {level:.3g} at step {evidence.train[-1].step} is {where} the guide's target "
        f"{low:g}-{high:g}; that target is only a guide, the level varies with the model and the data.",
        evidence={"step": evidence.train[-1].step, "smoothed_loss": level, "target": [low, high], "position": where},
    )


def _flow_matching(evidence: RunEvidence) -> bool:
    family = evidence.config.model_family if evidence.config.model_family != "auto" else evidence.model_family
    return family == "flux"


def training_time(evidence: RunEvidence) -> Finding | None:
    """The measured speed (median step_time of the last 20 steps: the first steps include warm-up) and
    the time left for config.steps."""
    times = [row.step_time for row in evidence.train if row.step_time]
    if not times:
        return None
    per_step = _recent_median(times)
    remaining = max(0, evidence.config.steps - evidence.train[-1].step) if evidence.config.steps else None
    left = "" if remaining is None else f": about {format_duration(remaining * per_step)} left for {remaining} steps"
    return Finding(
        rule="training-time",
        severity="info",
        message=f"training runs at {1 / per_step:.2f} it/s ({per_step:.2f} s per step){left}.",
        evidence={
            "seconds_per_step": per_step,
            "it_per_s": 1 / per_step,
            "remaining_steps": remaining,
            "remaining_seconds": remaining * per_step if remaining is not None else None,
        },
    )


TRAINING_RULES: list[Callable[[RunEvidence], Finding | None]] = [
    non_finite_loss,
    loss_spike,
    plateau_early,
    oscillation,
    overfitting_divergence,
    no_effect,
    sample_collapse,
    style_bleeding,
    gradient_exploding,
    gradient_vanishing,
    loss_target,
    training_time,
]


# What each `auto_stop_on` condition of the config watches for (training/run_evidence.py checks them).
AUTO_STOP_RULES: dict[str, list[Callable[[RunEvidence], Finding | None]]] = {
    "divergence": [overfitting_divergence, gradient_exploding],
    "plateau": [plateau_early],
    "no_effect": [no_effect],
}
