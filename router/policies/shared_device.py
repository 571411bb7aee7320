"""Engines sharing a device, as the cache-aware decision sees them: per candidate, its busy
neighbours on the device and the prefill queued on them (``CandidateView.device_busy`` and
``device_queued``; the decision's use of them is ``cache_aware_decide.device_slowdown`` and
``woken_s``), and the load its bounded-load guard compares (``device_loads``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from kvstack.router.engines import EngineState


def busy(st: EngineState) -> bool:
    """An engine busy on its device: a request in flight, running or waiting. The one measure of it
    for pricing a device's slowdown (here) and for learning it (``busy_on_device``)."""
    return st.load > 0


def busy_on_device(engine: EngineState, engines: Iterable[EngineState]) -> int:
    """How many engines are busy on ``engine``'s device, ``engine`` included (1: a device of its own
    or none named): the count flow control files a prefill-rate sample under
    (router/flow/device_speed.py), the decision's ``device_busy`` + 1."""
    device = engine.endpoint.device
    if not device:
        return 1
    return 1 + sum(1 for e in engines if e is not engine and e.endpoint.device == device and busy(e))


def device_neighbours(
    candidates: Sequence[EngineState],
    engines: Sequence[EngineState],
    queued: Callable[[EngineState], float],
) -> list[tuple[int, float]]:
    """Per candidate, the other engines of ``engines`` (every engine known: busy ones that are not
    candidates share the device too) busy (a request in flight, running or waiting) on the device
    it shares: how many, and the uncached prefill ``queued`` on them. (0, 0) for an engine with a
    device of its own. ``queued`` is asked once per busy engine."""
    if not any(st.endpoint.device for st in candidates):
        return [(0, 0.0)] * len(candidates)
    count: Counter[str] = Counter()
    total: dict[str, float] = {}
    own: dict[str, float] = {}  # a busy engine's queued tokens, to take off its device's total
    for st in engines:
        if (device := st.endpoint.device) and busy(st):
            own[st.url] = q = queued(st)
            count[device] += 1
            total[device] = total.get(device, 0.0) + q
    out = []
    for st in candidates:
        device = st.endpoint.device
        if not device:
            out.append((0, 0.0))
        else:
            mine = own.get(st.url)
            others = count[device] - (mine is not None)
            out.append((others, total.get(device, 0.0) - (mine or 0.0) if others else 0.0))
    return out


def sharing(speeds: Sequence[float]) -> float:
    """How much of a busy neighbour's load an engine on its device bears, from the device's speed
    with two engines busy (``speeds[0]``, relative to alone): 1 when they split the device equally
    (0.5 each: one compute), 0 when neither slows the other (1.0: as good as a device each), and
    between in proportion to the time the second engine costs the first (0.65, the H200 prior:
    0.54). None measured: equal splitting."""
    if not speeds:
        return 1.0
    return min(1.0, max(0.0, 1.0 / speeds[0] - 1.0))


def device_loads(
    candidates: Sequence[EngineState], share: Callable[[str], float] = lambda device: 1.0
) -> list[float | None]:
    """Per candidate, its load plus ``share(device)`` of the other candidates' load on the device
    it shares (None: a device of its own; ``share`` is asked per candidate: the caller memoizes).
    The bounded-load guard compares these: moving a request from a busy engine to an idle one on a
    device that is one compute adds no compute, so there the guard balances devices; where the
    engines barely slow each other (two LMCache engines on an H100 kept 0.9-1.0 of their speed
    alone, bench-results/lmcache section 18), each engine's own batch, KV and LMCache stores are
    the bottleneck, and it balances engines."""
    total: dict[str, float] = {}
    for st in candidates:
        if device := st.endpoint.device:
            total[device] = total.get(device, 0.0) + st.load
    return [
        st.load + share(d) * (total[d] - st.load) if (d := st.endpoint.device) else None for st in candidates
    ]
