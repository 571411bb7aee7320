"""What one LoRA round tells: ``status.adapters`` entries and the Events. Pure.

An entry per declared adapter: ``desired`` (engines the placement wants it on), ``loaded``
(ready engines that list it once the round's loads and unloads are done), ``engines`` (ready
engines of its model), the placement's ``reason``, and ``lastError``: the round's failure, else
the previous one until the adapter is loaded everywhere it is wanted.

The Events: one ``AdapterLoaded`` / ``AdapterUnloaded`` per adapter and round naming the engines,
and an ``AdapterLoadFailed`` / ``AdapterUnloadFailed`` warning per failed call that says something new.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kvstack.common.lora import LoraError
from kvstack.operator.conditions import Condition
from kvstack.operator.lora_placement import Placement

Op = Literal["load", "unload"]
AdapterNotice = Literal["AdapterLoaded", "AdapterUnloaded", "AdapterLoadFailed", "AdapterUnloadFailed"]
Obj = dict[str, Any]


@dataclass(frozen=True, slots=True)
class OpResult:
    """One load or unload call on one engine."""

    engine: str
    adapter: str
    op: Op
    error: LoraError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class Told:
    warning: bool
    reason: AdapterNotice
    message: str


def loaded_after(
    before: Mapping[str, frozenset[str]], results: Sequence[OpResult]
) -> dict[str, frozenset[str]]:
    """Each ready engine's adapters once the successful calls are done."""
    after = {engine: set(names) for engine, names in before.items()}
    for r in results:
        if r.ok and r.engine in after:
            (after[r.engine].add if r.op == "load" else after[r.engine].discard)(r.adapter)
    return {engine: frozenset(names) for engine, names in after.items()}


def entries(
    model: str,
    placement: Placement,
    loaded: Mapping[str, frozenset[str]],
    results: Sequence[OpResult],
    previous: Mapping[str, Mapping[str, Any]],
) -> list[Obj]:
    """``status.adapters`` entries of one model's declared adapters (``loaded``: ready engines only)."""
    out: list[Obj] = []
    for plan in placement.adapters:
        count = sum(plan.name in names for names in loaded.values())
        entry: Obj = {
            "name": plan.name,
            "model": model,
            "desired": plan.wanted,
            "loaded": count,
            "engines": len(loaded),
            "reason": plan.reason,
        }
        failed = [r for r in results if r.adapter == plan.name and r.error is not None]
        if failed:
            entry["lastError"] = _error_text(failed[-1])
        elif count < plan.wanted and "lastError" in previous.get(plan.name, {}):
            entry["lastError"] = previous[plan.name]["lastError"]
        out.append(entry)
    return out


def _error_text(r: OpResult) -> str:
    assert r.error is not None
    return f"{r.op} on {r.engine}: {r.error.message}"[:1000]


def notices(
    model: str, results: Sequence[OpResult], previous: Mapping[str, Mapping[str, Any]] | None = None
) -> list[Told]:
    """The Events of one round: successes grouped per adapter, each failure on its own.

    A failure that repeats the adapter's previous ``lastError`` is not posted again: the operator
    retries every round, and one Event per problem says it (the counter counts every retry).
    """
    out: list[Told] = []
    done_reasons: tuple[tuple[Op, AdapterNotice], ...] = (
        ("load", "AdapterLoaded"),
        ("unload", "AdapterUnloaded"),
    )
    for op, reason in done_reasons:
        done: dict[str, list[str]] = {}
        for r in results:
            if r.op == op and r.ok:
                done.setdefault(r.adapter, []).append(r.engine)
        for adapter, engines in done.items():
            verb = "loaded on" if op == "load" else "unloaded from"
            message = f"{model}: adapter {adapter} {verb} {', '.join(sorted(engines))}"
            out.append(Told(False, reason, message))
    previous = previous or {}
    for r in results:
        if r.error is not None and previous.get(r.adapter, {}).get("lastError") != _error_text(r):
            failed: AdapterNotice = "AdapterLoadFailed" if r.op == "load" else "AdapterUnloadFailed"
            what = f"{model}: {r.op} of adapter {r.adapter} on {r.engine} failed"
            out.append(Told(True, failed, f"{what} ({r.error.kind}): {r.error.message}"))
    return out


def adapters_ready(adapters: Sequence[Mapping[str, Any]], generation: int | None) -> Condition:
    """The ``AdaptersReady`` condition from the round's ``status.adapters`` entries."""
    failing = [a for a in adapters if a.get("lastError")]
    if failing:
        text = "; ".join(f"{a['name']}: {a['lastError']}" for a in failing)
        return Condition(False, "AdapterLoadFailed", text[:1000], generation)
    short = [a for a in adapters if int(a.get("loaded", 0)) < int(a.get("desired", 0))]
    if short:
        text = ", ".join(f"{a['name']} {a.get('loaded', 0)}/{a.get('desired', 0)}" for a in short)
        return Condition(False, "AdaptersLoading", f"loaded/wanted: {text}"[:1000], generation)
    return Condition(True, "AdaptersLoaded", f"{len(adapters)} adapters loaded where wanted", generation)
