"""How fast an engine prefills with k engines busy on its device, relative to alone: learnt.

Engines sharing one accelerator (several vLLM engines on one GPU) slow each other down while more
than one is busy, and by how much depends on the card and the engines: the H200 simulators' fit
says each keeps 0.65 of its speed alone with two busy; two eager 8B-shaped LMCache engines on an
H100 kept ~0.9-1.0 (bench-results/lmcache section 17). The cache-aware cost model prices that
slowdown (``cache_aware_decide.device_slowdown``): at 0.65 it priced the idle engine beside a busy
one as slow and slowing, and put every request on the busy one. So it is learnt here, per device:

* every prefill-rate sample flow control takes (``saturation.rate_sample``) goes into the device's
  bucket for the number of its engines busy when the request was sent (itself included, counted as
  the decision counts them: ``policies.shared_device.busy_on_device``), an EWMA
  of weight :data:`WEIGHT`;
* the speed with k busy is bucket k's rate over bucket 1's (the engine alone), once both hold
  :data:`MIN_SAMPLES`; clipped to [:data:`MIN_SPEED`, 1] and never above the speed with fewer busy;
* a count without enough samples keeps the configured prior (``shared_device_speed``), and so does
  every count while the engine alone is not yet measured.

Pure: no clock, no I/O; :class:`kvstack.router.flow.room.Room` holds each device's buckets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

MIN_SAMPLES = 8  # per bucket: one stalled request never sets a device's speed
WEIGHT = 0.1
MIN_SPEED = 0.05


@dataclass(frozen=True, slots=True)
class Bucket:
    """The prefill rate (tokens/s) samples showed with one number of engines busy on a device."""

    rate: float
    samples: int


def observe(buckets: Mapping[int, Bucket], busy: int, sample: float) -> dict[int, Bucket]:
    """``buckets`` after one rate ``sample`` taken with ``busy`` engines busy (itself included)."""
    k = max(1, busy)
    known = buckets.get(k)
    if known is None:
        learnt = Bucket(sample, 1)
    else:
        learnt = Bucket(known.rate + WEIGHT * (sample - known.rate), known.samples + 1)
    return {**buckets, k: learnt}


def alone_rate(buckets: Mapping[int, Bucket]) -> float | None:
    """The device's prefill rate with one engine busy, once measured (None: not yet)."""
    alone = buckets.get(1)
    return alone.rate if alone is not None and alone.samples >= MIN_SAMPLES else None


def speeds(buckets: Mapping[int, Bucket], prior: tuple[float, ...]) -> tuple[float, ...]:
    """The speeds relative to alone with 2, 3, ... engines busy (``shared_device_speed``'s shape):
    learnt where measured, else the prior's entry; non-increasing."""
    alone = alone_rate(buckets)
    if alone is None or alone <= 0:
        return prior
    measured = {k: b.rate / alone for k, b in buckets.items() if k >= 2 and b.samples >= MIN_SAMPLES}
    if not measured:
        return prior
    out: list[float] = []
    for k in range(2, max(len(prior) + 1, max(measured)) + 1):
        if k in measured:
            speed = min(1.0, max(MIN_SPEED, measured[k]))
        elif k - 2 < len(prior):
            speed = prior[k - 2]
        else:  # past the prior and unmeasured: what sharing the last speed further gives
            speed = out[-1] * (k - 1) / k
        out.append(min(speed, out[-1]) if out else speed)
    return tuple(out)
