"""Which engines of a model hold which LoRA adapters. Pure: no clock, no I/O.

One placement turns the declared adapters, the model's engines (ready or not, and what each one
lists as loaded), the slots per engine (``max_loras``) and each adapter's request rate into the
adapters every engine should hold, and the loads and unloads that get it there:

1. only ready engines hold adapters (``E`` of them); with none, every adapter is ``no_engines``
   and nothing is done (an engine that comes back is placed on at the next evaluation);
2. pinned adapters go on every ready engine, in declared order, as long as they fit in the slots;
   a pinned adapter beyond the slots is ``no_capacity``;
3. the other adapters share what the pinned ones leave (``E * (slots - pinned)``), in turn:

   a. first engines: with the request rates known, every adapter with demand gets one engine,
      busiest first (one loaded somewhere counts its rate raised by ``margin``, as in c.), while
      slots remain (``demand``; the rest ``no_capacity``); with the rates
      unknown (Prometheus unreachable), every adapter keeps the engines it has (``held``): never
      move adapters on what we cannot see;
   b. coverage: adapters on no engine get one while slots remain (``spare_capacity``: every
      declared adapter is loaded somewhere when capacity allows, so its first request waits for
      no load; the ones loaded somewhere already first, then in declared order);
   c. more engines for the busy (rates known): each further slot goes to the adapter with the
      highest rate per engine after it (``rate / (engines + 1)``, the D'Hondt rule), at most
      ``E``. Hysteresis: while an adapter counts fewer engines than it has now, its claim is
      raised by ``margin`` (25 %), so it keeps an engine unless another adapter needs it by more
      than that; rates that barely move change nothing;
   d. slots still free: adapters keep engines they have beyond their share (``kept``: an unload
      that frees a slot nobody wants is churn). What is on no engine is ``idle``;
4. engines for each adapter, most engines first: those that hold it already, then those with the
   most free slots (then by name), never more than ``slots`` per engine;
5. per engine, the adapters to unload (held but not placed there, undeclared ones included) and
   to load (placed but not held). An engine that restarted lists fewer adapters than placed: its
   loads bring them back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Reason = Literal[
    "pinned",  # on every ready engine
    "demand",  # engines in proportion to its request rate
    "held",  # request rates unknown: keeps the engines it has
    "spare_capacity",  # no demand, but a slot was free
    "kept",  # keeps engines beyond its share: no one else wants the slots
    "idle",  # no demand and no free slot: on no engine
    "no_capacity",  # wanted, but every slot is taken
    "no_engines",  # the model has no ready engine
]
REASONS: tuple[Reason, ...] = (
    "pinned",
    "demand",
    "held",
    "spare_capacity",
    "kept",
    "idle",
    "no_capacity",
    "no_engines",
)
DEFAULT_MARGIN = 0.25


@dataclass(frozen=True, slots=True)
class Declared:
    """A declared adapter, as placement sees it."""

    name: str
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class EngineState:
    """One engine of the model: its pod name, readiness, and the adapters it lists as loaded."""

    name: str
    ready: bool
    loaded: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class AdapterPlan:
    name: str
    engines: tuple[str, ...]  # where it should be loaded, sorted
    wanted: int  # the engines it should be on; more than len(engines) when slots ran out
    reason: Reason


@dataclass(frozen=True, slots=True)
class EngineChange:
    engine: str
    unload: tuple[str, ...]  # first: frees slots
    load: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Placement:
    adapters: tuple[AdapterPlan, ...]  # in declared order
    changes: tuple[EngineChange, ...]  # engines with something to do, by name

    def plan(self, name: str) -> AdapterPlan | None:
        return next((p for p in self.adapters if p.name == name), None)


def place(
    declared: Sequence[Declared],
    engines: Sequence[EngineState],
    slots: int,
    demand: Mapping[str, float] | None,
    *,
    margin: float = DEFAULT_MARGIN,
) -> Placement:
    """The adapters each engine should hold; ``demand`` None: the request rates are unknown."""
    if slots < 1:
        raise ValueError("slots must be at least 1")
    ready = sorted((e for e in engines if e.ready), key=lambda e: e.name)
    names = [d.name for d in declared]
    if not ready:
        plans = tuple(AdapterPlan(n, (), 0, "no_engines") for n in names)
        return Placement(plans, ())
    count = len(ready)
    current = {n: sum(n in e.loaded for e in ready) for n in names}

    wanted: dict[str, int] = {}
    reasons: dict[str, Reason] = {}
    pinned = [d.name for d in declared if d.pinned]
    pinned_fit = pinned[:slots]
    for name in pinned:
        wanted[name], reasons[name] = (count, "pinned") if name in pinned_fit else (0, "no_capacity")

    others = [d.name for d in declared if not d.pinned]
    free = count * (slots - len(pinned_fit))
    rate = {n: max(0.0, demand.get(n, 0.0)) for n in others} if demand is not None else None
    if rate is not None:
        # an adapter loaded somewhere claims its first engine with the margin too (hysteresis)
        first = {n: rate[n] * (1 + margin if current[n] else 1.0) for n in others}
        busy = sorted((n for n in others if rate[n] > 0), key=lambda n: (-first[n], -current[n], n))
        for name in busy:
            wanted[name], reasons[name] = (1, "demand") if free else (0, "no_capacity")
            free -= wanted[name]
    else:
        for name in sorted(others, key=lambda n: (-current[n], names.index(n))):
            if take := min(current[name], free):
                wanted[name], reasons[name] = take, "held"
                free -= take
    # every declared adapter somewhere when capacity allows, the ones loaded somewhere first
    for name in sorted(others, key=lambda n: (current[n] == 0, names.index(n))):
        if free and name not in wanted:
            wanted[name], reasons[name] = 1, "spare_capacity"
            free -= 1
    if rate is not None:
        free = _more_for_the_busy(others, rate, current, count, free, margin, wanted)
    for name in others:
        extra = min(current[name] - wanted.get(name, 0), free)
        if extra > 0:
            wanted[name] = wanted.get(name, 0) + extra
            reasons.setdefault(name, "kept")
            free -= extra
        reasons.setdefault(name, "idle")
        wanted.setdefault(name, 0)

    hosts = _assign(names, pinned_fit, wanted, ready, slots)
    plans = tuple(AdapterPlan(n, tuple(sorted(hosts[n])), wanted[n], reasons[n]) for n in names)
    return Placement(plans, _changes(ready, hosts))


def _more_for_the_busy(
    others: Sequence[str],
    rate: Mapping[str, float],
    current: Mapping[str, int],
    count: int,
    free: int,
    margin: float,
    wanted: dict[str, int],
) -> int:
    """Step 3a's further slots: D'Hondt with hysteresis. Returns the slots left."""
    while free:
        best: str | None = None
        best_claim = 0.0
        for name in others:
            n = wanted.get(name, 0)
            if n == 0 or n >= count:
                continue  # an adapter without a first engine got no slot at all: none left
            claim = rate[name] / (n + 1) * (1 + margin if n < current[name] else 1.0)
            if claim > best_claim:
                best, best_claim = name, claim
        if best is None:
            break
        wanted[best] += 1
        free -= 1
    return free


def _assign(
    names: Sequence[str],
    pinned: Sequence[str],
    wanted: Mapping[str, int],
    ready: Sequence[EngineState],
    slots: int,
) -> dict[str, set[str]]:
    """Step 4: the engines of each adapter, keeping what is loaded where it can."""
    hosts: dict[str, set[str]] = {n: set() for n in names}
    used = {e.name: 0 for e in ready}
    for name in pinned:
        hosts[name] = {e.name for e in ready}
        for e in ready:
            used[e.name] += 1
    order = sorted((n for n in names if n not in pinned and wanted[n]), key=lambda n: (-wanted[n], n))
    # Keep every placement that still fits first, so a newcomer never displaces a loaded adapter.
    for name in order:
        for e in ready:
            if len(hosts[name]) < wanted[name] and name in e.loaded and used[e.name] < slots:
                hosts[name].add(e.name)
                used[e.name] += 1
    for name in order:
        for e in sorted(ready, key=lambda e: (used[e.name], e.name)):
            if len(hosts[name]) >= wanted[name]:
                break
            if e.name not in hosts[name] and used[e.name] < slots:
                hosts[name].add(e.name)
                used[e.name] += 1
    return hosts


def _changes(ready: Sequence[EngineState], hosts: Mapping[str, set[str]]) -> tuple[EngineChange, ...]:
    out: list[EngineChange] = []
    for e in ready:
        should = {n for n, where in hosts.items() if e.name in where}
        unload, load = tuple(sorted(e.loaded - should)), tuple(sorted(should - e.loaded))
        if unload or load:
            out.append(EngineChange(e.name, unload, load))
    return tuple(out)
