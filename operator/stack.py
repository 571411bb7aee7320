"""One ``KVStack``'s handling, without kopf: apply its spec, resync it, evaluate it, forget it.

The kopf handlers (:mod:`kvstack.operator.handlers`) unpack kopf's arguments, call these and write
what they return into the resource: a :class:`StatusChange` (conditions, status fields, Events).
What to do when is decided by pure functions (:func:`plan_tick`, :func:`evaluation_due`,
:func:`body_is_current`, :func:`notices`, :mod:`kvstack.operator.conditions`); the async functions
do the I/O through the :class:`~kvstack.operator.runtime.Runtime`'s clients.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kvstack.common.config import ConfigError
from kvstack.operator.conditions import Condition, Conditions, evaluated, lost, reconciled
from kvstack.operator.controller import Evaluation, ScalingState, evaluate, reconcile
from kvstack.operator.kube import Kube, KubeError
from kvstack.operator.lora_loader import run_stack as run_lora
from kvstack.operator.lora_report import adapters_ready
from kvstack.operator.metrics import OperatorMetrics
from kvstack.operator.ownership import Owner
from kvstack.operator.runtime import Runtime
from kvstack.operator.spec import KVStackSpec, parse_spec
from kvstack.operator.status import engines_summary

Obj = dict[str, Any]
Logger = logging.Logger | logging.LoggerAdapter[Any]
NoticeReason = Literal[
    "InvalidSpec",
    "ScaledUp",
    "ScaledDown",
    "PrometheusUnreachable",
    # LoRA adapters (kvstack.operator.lora_report)
    "AdapterLoaded",
    "AdapterUnloaded",
    "AdapterLoadFailed",
    "AdapterUnloadFailed",
]
EVENT_MESSAGE_LIMIT = 1000


@dataclass
class StackMemory:
    """What this process remembers of one stack between handler calls (kept in kopf's memo)."""

    # One reconcile at a time: the change handlers and the timer run concurrently.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    applied_generation: int | None = None  # the generation the last successful apply wrote
    invalid: bool = False  # the engine loader refuses the spec: nothing to do until it changes
    next_resync: float | None = None  # None: this process has not applied the spec yet
    next_evaluation: float = 0.0
    scaling: ScalingState = field(default_factory=ScalingState)
    conditions: Conditions = field(default_factory=dict)  # every condition this process has set


@dataclass(frozen=True, slots=True)
class Notice:
    """An Event to post on the stack."""

    warning: bool
    reason: NoticeReason
    message: str


@dataclass(frozen=True, slots=True)
class StatusChange:
    """What one handler call writes: conditions to set, other status fields, Events."""

    conditions: Conditions = field(default_factory=dict)
    fields: Obj = field(default_factory=dict)  # observedGeneration, models, engines, router
    notices: tuple[Notice, ...] = ()


@dataclass(frozen=True, slots=True)
class Applied:
    """An apply's outcome; ``failed`` set: the API refused a write and the handler must retry."""

    change: StatusChange
    failed: KubeError | None = None


@dataclass(frozen=True, slots=True)
class TickPlan:
    resend: bool  # status lost a condition this process set: render them all again
    resync: bool  # re-apply every owned object (undoes hand edits)


def plan_tick(memory: StackMemory, existing: Sequence[Mapping[str, Any]], now: float) -> TickPlan:
    """What a timer tick does before evaluating: resend the conditions, resync the objects."""
    resync = not memory.invalid and memory.next_resync is not None and now >= memory.next_resync
    return TickPlan(resend=lost(existing, memory.conditions), resync=resync)


def evaluation_due(memory: StackMemory, now: float) -> bool:
    return not memory.invalid and now >= memory.next_evaluation


def body_is_current(generation: int | None, applied_generation: int | None) -> bool:
    """Whether a timer's body is at least as new as the last applied one.

    A timer may hold a body older than the one a change handler just applied: re-applying it would
    bring back what that handler pruned.
    """
    return (generation or 0) >= (applied_generation or 0)


def notices(seen: Evaluation, reachable_before: Condition | None) -> tuple[Notice, ...]:
    """The Events of one evaluation: each scaling, and Prometheus going unreachable (once per outage)."""
    out: list[Notice] = []
    for outcome in seen.models:
        d, e = outcome.decision, outcome.entry
        if d is not None and d.changed:
            text = f"{e['name']}: {e['currentReplicas']} -> {d.replicas} ({d.reason}): {d.message}"
            out.append(Notice(False, "ScaledUp" if d.direction == "up" else "ScaledDown", text))
    if seen.prometheus_ok is False and (reachable_before is None or reachable_before.status):
        out.append(Notice(True, "PrometheusUnreachable", seen.prometheus_error))
    return tuple(out)


def status_fields(seen: Evaluation) -> Obj:
    """``status.models``, ``engines`` (the printer column) and ``router`` (when there is one)."""
    entries = [m.entry for m in seen.models]
    out: Obj = {"models": entries, "engines": engines_summary(entries)}
    if seen.router:
        out["router"] = seen.router
    return out


async def apply(
    kube: Kube,
    owner: Owner,
    raw_spec: Mapping[str, Any],
    generation: int | None,
    memory: StackMemory,
    *,
    now: float,
    resync_seconds: float,
    logger: Logger,
) -> Applied:
    """Parse the spec and reconcile the stack's objects (prune what it dropped)."""
    try:
        spec = parse_spec(dict(raw_spec), f"KVStack {owner.namespace}/{owner.name}")
        async with memory.lock:
            pruned = await reconcile(kube, owner, spec)
            memory.applied_generation = generation
    except ConfigError as err:
        # A spec the engine loader refuses: nothing to retry until someone edits it.
        logger.error("%s", err)
        memory.invalid = True
        return Applied(
            StatusChange(
                reconciled("invalid", str(err), generation),
                {"observedGeneration": generation},
                (Notice(True, "InvalidSpec", str(err)),),
            )
        )
    except KubeError as err:
        return Applied(StatusChange(reconciled("failed", str(err), generation)), failed=err)
    memory.invalid = False
    memory.next_resync = now + resync_seconds
    memory.next_evaluation = now  # observe at once
    if pruned:
        logger.info("pruned %s", ", ".join(f"{kind}/{n}" for _, kind, n in pruned))
    applied = reconciled("applied", f"{len(spec.models)} models applied", generation)
    return Applied(StatusChange(applied, {"observedGeneration": generation}))


async def tick(
    runtime: Runtime,
    owner: Owner,
    raw_spec: Mapping[str, Any],
    generation: int | None,
    status: Mapping[str, Any],
    memory: StackMemory,
    *,
    now: float,
    logger: Logger,
) -> StatusChange | None:
    """One timer tick: resend lost conditions, resync when due, evaluate when due; None: write nothing."""
    try:
        spec = parse_spec(dict(raw_spec))
    except ConfigError:
        return None  # the change handler reported it
    plan = plan_tick(memory, status.get("conditions") or [], now)
    resent = StatusChange() if plan.resend else None
    kube = runtime.kube
    if kube is None:
        return resent  # shutting down: cleanup closed the client
    try:
        if plan.resync:
            memory.next_resync = now + runtime.settings.resync_seconds
            await _resync(kube, owner, spec, generation, memory, logger)
        # Checked after the resync: a change handler that applied meanwhile asks for its own evaluation.
        if not evaluation_due(memory, now):
            return resent
        memory.next_evaluation = now + spec.autoscaling.interval_seconds
        previous = {str(m.get("name")): m for m in status.get("models") or [] if isinstance(m, dict)}
        change = await evaluate_stack(runtime, kube, owner, spec, generation, previous, memory)
        return await with_adapters(
            runtime, kube, owner, spec, generation, status.get("adapters") or [], change
        )
    except Exception as err:
        if runtime.closing:
            # cleanup closed the clients under this request (a transport error, or httpx's
            # RuntimeError for a closed client): the operator is stopping, nothing to report.
            return resent
        if not isinstance(err, KubeError):
            raise
        logger.warning("evaluation failed, retrying at the next interval: %s", err)
    return resent


async def _resync(
    kube: Kube, owner: Owner, spec: KVStackSpec, generation: int | None, memory: StackMemory, logger: Logger
) -> None:
    """Re-apply every owned object (undoes hand edits); a refusal waits for the next resync."""
    try:
        async with memory.lock:
            if body_is_current(generation, memory.applied_generation):
                await reconcile(kube, owner, spec)
    except (KubeError, ConfigError) as err:
        logger.warning("resync failed: %s", err)


async def evaluate_stack(
    runtime: Runtime,
    kube: Kube,
    owner: Owner,
    spec: KVStackSpec,
    generation: int | None,
    previous: dict[str, Obj],
    memory: StackMemory,
) -> StatusChange:
    """Observe every model (and scale it when autoscaling is on): the conditions, fields and Events."""
    auto = spec.autoscaling
    prom = runtime.prometheus(auto.prometheus_url) if auto.enabled else None
    seen = await evaluate(kube, prom, runtime.metrics, owner, spec, memory.scaling, previous)
    if seen.prometheus_ok is not None:
        runtime.metrics.prometheus_up.set(1 if seen.prometheus_ok else 0)
    told = notices(seen, memory.conditions.get("PrometheusReachable"))
    return StatusChange(evaluated(seen, spec, generation), status_fields(seen), told)


async def with_adapters(
    runtime: Runtime,
    kube: Kube,
    owner: Owner,
    spec: KVStackSpec,
    generation: int | None,
    previous: Sequence[Mapping[str, Any]],
    change: StatusChange,
) -> StatusChange:
    """The evaluation's change plus the LoRA round's ``status.adapters`` and Events."""
    if runtime.lora is None:
        return change
    prom = runtime.prometheus(spec.autoscaling.prometheus_url)
    lora = await run_lora(kube, runtime.lora, prom, runtime.metrics, owner, spec, previous)
    if lora is None:
        return change
    told = tuple(Notice(t.warning, t.reason, t.message) for t in lora.told)
    fields = {**change.fields, "adapters": lora.adapters}
    # set while a model declares adapters, and once more when the last section goes (none left)
    conditions = {**change.conditions, "AdaptersReady": adapters_ready(lora.adapters, generation)}
    return StatusChange(conditions, fields, change.notices + told)


def forget(metrics: OperatorMetrics, namespace: str, raw_spec: Mapping[str, Any]) -> None:
    """A deleted stack: drop its models' series (its objects go with it through their ownerReferences)."""
    try:
        spec = parse_spec(dict(raw_spec))
    except ConfigError:
        return
    for model in spec.models:
        metrics.forget(namespace, model.served_names[0])
