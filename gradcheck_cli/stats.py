"""Statistics over plain lists of floats: mean and spread, median, percentile.

Stdlib only and free of any gradclip type, so the schema (``results``) and the rules
(``analysis``) share one implementation of each. See docs/diagnosis.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SMOOTH_STEPS = 10  # the smoothed loss is the mean of this many last losses


@dataclass(frozen=True)
class Smoothed:
    """The mean of ``n`` values and their sample standard deviation."""

    mean: float
    sd: float
    n: int


def mean_sd(values: list[float]) -> Smoothed:
    """``Smoothed`` of finite ``values`` (at least one): their mean and sample standard deviation
    (0 for one value), computed without overflow for values near the float limit."""
    n = len(values)
    mean = math.fsum(x / n for x in values)  # divided first: no overflow for values near the float limit
    if n < 2:
        return Smoothed(mean, 0.0, n)
    # Centred and scaled by the largest deviation, so nothing overflows unless the spread
    # itself is beyond float range (then it is inf).
    deviations = [x - mean for x in values]
    scale = max(abs(d) for d in deviations)
    if not math.isfinite(scale):
        return Smoothed(mean, math.inf, n)
    if scale == 0:
        return Smoothed(mean, 0.0, n)
    sd = scale * math.sqrt(math.fsum((d / scale) ** 2 for d in deviations) / (n - 1))
    return Smoothed(mean, sd, n)


def median(sorted_values: list[float]) -> float:
    """The median of already sorted values (at least one); the mean of the middle two for an
    even count."""
    n = len(sorted_values)
    mid = n // 2
    return sorted_values[mid] if n % 2 else (sorted_values[mid - 1] + sorted_values[mid]) / 2.0


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default) of already sorted values; ``None`` for
    none."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
