"""Fitting the simulator's LMCache offload cost to real engine logs (pure).

LMCache 0.5.3 logs one line per request whose prefill it stores, e.g. ``Stored 512 out of total 512
tokens. size: 0.0625 GB, cost 3.5752 ms, ...; offload_time: 3.4676 ms, put_time: 0.0793 ms``.
:func:`offload_fit` turns such lines into ``offload_time = fixed + per_token x tokens`` with a
Theil-Sen line (the median of pairwise slopes): robust to the steps that stalled behind the other
engine on a shared GPU, which a least-squares line would chase.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

_STORED = re.compile(r"Stored (\d+) out of total \d+ tokens\..*?offload_time: ([\d.]+) ms")


@dataclass(frozen=True, slots=True)
class OffloadFit:
    """``offload_time = fixed_us + per_token_us x tokens`` over ``points`` log lines."""

    fixed_us: float
    per_token_us: float
    points: int


def offloads(lines: Iterable[str]) -> list[tuple[int, float]]:
    """(tokens stored, offload_time in microseconds) of every LMCache store line."""
    out: list[tuple[int, float]] = []
    for line in lines:
        m = _STORED.search(line)
        if m:
            out.append((int(m.group(1)), 1000.0 * float(m.group(2))))
    return out


def theil_sen(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope): the median pairwise slope, then the median intercept under it."""
    slopes = [(y2 - y1) / (x2 - x1) for (x1, y1), (x2, y2) in combinations(points, 2) if x1 != x2]
    if not slopes:
        raise ValueError("need points at two different x values at least")
    slope = statistics.median(slopes)
    return statistics.median(y - slope * x for x, y in points), slope


def offload_fit(lines: Iterable[str]) -> OffloadFit:
    """The offload cost fitted to LMCache's store lines among ``lines``."""
    points = offloads(lines)
    fixed, per_token = theil_sen(points)
    return OffloadFit(fixed_us=fixed, per_token_us=per_token, points=len(points))
