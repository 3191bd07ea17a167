"""Is a noisy loss going down? A least-squares line through the log-loss, and how sure that is.

Per-step diffusion loss is noise around a slow trend: each step draws its own timesteps, so the loss of
one step varies several-fold (log-normal-like) while the level moves by a few percent over hundreds of
steps. On the log scale that noise is roughly symmetric and of constant size, so a straight-line fit
with its standard error says whether the loss fell (a trend) or only wobbled (none).
"""

from __future__ import annotations

import math
from statistics import linear_regression

from pydantic import BaseModel

# A trend counts at 3 standard errors: pure noise reaches it in ~1 window of 700 (one-sided normal tail
# 0.13%); the rules judge a run at every metrics check, so a looser line would raise false alarms over a run.
TREND_Z = 3.0


class Trend(BaseModel):
    drop: float  # the fitted line's fall over the window, relative to its start (0.1: 10% lower; < 0: rose)
    z: float  # that fall in standard errors of the fit (>= TREND_Z: a real fall; <= -TREND_Z: a real rise)

    @property
    def falling(self) -> bool:
        return self.z >= TREND_Z


def fit_trend(values: list[float]) -> Trend:
    """The trend of `values` (positive losses, at least 3) over their window, one value per step."""
    n = len(values)
    logs = [math.log(max(value, 1e-12)) for value in values]
    xs = range(n)
    slope, intercept = linear_regression(xs, logs)
    residual = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, logs)) / (n - 2)
    spread = sum((x - (n - 1) / 2) ** 2 for x in xs)
    error = math.sqrt(residual / spread) if spread > 0 else 0.0
    z = -slope / error if error > 0 else (math.inf if slope < 0 else -math.inf if slope > 0 else 0.0)
    return Trend(drop=1 - math.exp(slope * (n - 1)), z=z)
