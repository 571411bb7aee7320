"""Summary statistics for benchmark results (pure)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Population standard deviation over mean; 0 for constant or empty input."""
    if not values:
        return 0.0
    mean = sum(values) / len(values)
    if mean == 0:
        return 0.0
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return math.sqrt(var) / mean


def summarize(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 and mean."""
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": (sum(values) / len(values)) if values else math.nan,
    }


def quantile_ratio_interval(
    ours: Sequence[float],
    theirs: Sequence[float],
    q: float = 90.0,
    *,
    confidence: float = 0.95,
    iterations: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """A bootstrap interval for ``percentile(ours, q) / percentile(theirs, q)``.

    Both samples are resampled with replacement ``iterations`` times (a fixed ``seed``, so a result
    file always yields the same interval); the interval holds the central ``confidence`` share of
    the resampled ratios. It tells a real difference from run-to-run noise: when its low end is
    above 1, ``ours`` is worse beyond what resampling the same requests explains. NaNs for an empty
    sample.
    """
    if not ours or not theirs:
        return math.nan, math.nan
    rng = random.Random(seed)
    a, b = list(ours), list(theirs)
    ratios = []
    for _ in range(iterations):
        num = percentile(rng.choices(a, k=len(a)), q)
        den = percentile(rng.choices(b, k=len(b)), q)
        ratios.append(num / den if den else math.inf)
    tail = 100.0 * (1.0 - confidence) / 2.0
    return percentile(ratios, tail), percentile(ratios, 100.0 - tail)
