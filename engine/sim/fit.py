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


# ``[req_id=...] Retrieved 4608 out of 4608 required tokens (from 6656 total tokens). size: 0.5625 gb,
# cost 1531.2 ms, throughput: 0.3672 GB/s``: one line per request LMCache loaded KV for.
_RETRIEVED = re.compile(
    r"Retrieved (\d+) out of (\d+) required tokens .*?cost ([\d.]+) ms, throughput: ([\d.]+) GB/s"
)
# LMCache's local CPU tier copies at 10-40 GB/s; its Redis connector at 0.02-0.5 GB/s (one chunk of
# 32 MB per round trip) and 0 when nothing came back: the two tiers never overlap in between.
REMOTE_BELOW_GB_S = 5.0


@dataclass(frozen=True, slots=True)
class Retrieve:
    """One logged LMCache load: tokens loaded of those asked for, and how long it took."""

    retrieved: int
    required: int
    cost_us: float
    gb_per_s: float

    @property
    def remote(self) -> bool:
        return self.gb_per_s < REMOTE_BELOW_GB_S


@dataclass(frozen=True, slots=True)
class RetrieveFit:
    """LMCache load costs per tier, per token asked for (a failed load costs its attempt too)."""

    cpu_us_per_token: float
    remote_us_per_token: float
    remote_failure: float  # tokens asked of the remote tier that did not come back / tokens asked
    remote_chunk_failure: float  # per chunk read in order: the chance that it fails (geometric MLE)
    cpu_points: int
    remote_points: int


def retrieves(lines: Iterable[str]) -> list[Retrieve]:
    """Every LMCache ``Retrieved N out of M required tokens`` line among ``lines``."""
    out: list[Retrieve] = []
    for line in lines:
        m = _RETRIEVED.search(line)
        if m:
            out.append(
                Retrieve(int(m.group(1)), int(m.group(2)), 1000.0 * float(m.group(3)), float(m.group(4)))
            )
    return out


def retrieve_fit(lines: Iterable[str], chunk_size: int = 256) -> RetrieveFit:
    """Median microseconds per asked-for token of each tier, and the remote tier's failures.

    LMCache reads a request's chunks in order and stops at the first it cannot read back, so each
    remote load is a run of successes ended by one failure or by the end of the request: the chance
    that a chunk fails is failures / (chunks read + failures).
    """
    points = [p for p in retrieves(lines) if p.required > 0]
    cpu = [p for p in points if not p.remote]
    remote = [p for p in points if p.remote]
    if not cpu or not remote:
        raise ValueError("need loads from both the CPU tier and the remote tier")
    asked = sum(p.required for p in remote)
    failed = sum(p.retrieved < p.required for p in remote)
    return RetrieveFit(
        cpu_us_per_token=statistics.median(p.cost_us / p.required for p in cpu),
        remote_us_per_token=statistics.median(p.cost_us / p.required for p in remote),
        remote_failure=sum(p.required - p.retrieved for p in remote) / asked,
        remote_chunk_failure=failed / (sum(p.retrieved // chunk_size for p in remote) + failed),
        cpu_points=len(cpu),
        remote_points=len(remote),
    )
