"""The ``KVStack`` status conditions: what each says, decided from what was observed. Pure.

Five conditions, each with a typed reason:

- ``Reconciled``: the last apply of the spec. ``Applied``; ``ApplyFailed`` (the API refused a write:
  retried); ``InvalidSpec`` (the engine loader refuses the spec: nothing applied until it changes).
- ``Ready``: every model has its desired engines ready, every model of the spec has its Deployment,
  and the router (when enabled) has its replicas ready: ``AllReady``, else ``Progressing``; an invalid
  spec is ``InvalidSpec``. The message is the printer column's ``ready/desired``.
- ``PrometheusReachable``: ``QuerySucceeded`` or ``QueryFailed`` (the message says why); unchanged
  while nothing was asked (autoscaling off, no engine Deployment yet).
- ``ScalingActive``: with Prometheus answering, the reasons of the last decisions (``queue``,
  ``steady``, ...), False only when every decision held for missing data; ``MetricsUnavailable``
  while Prometheus does not answer (replicas held); ``Disabled`` when autoscaling is off.
  Unchanged while autoscaling is on but nothing was asked (no engine Deployment yet).
- ``AdaptersReady`` (stacks that declare LoRA adapters): ``AdaptersLoaded``, ``AdaptersLoading`` or
  ``AdapterLoadFailed``, decided by :func:`kvstack.operator.lora_report.adapters_ready`.

Handlers and the timer patch status separately and a JSON merge patch replaces the whole list, so
each writer sends every condition this process has set (:func:`render`), never only its own; a
timer tick that finds one of them :func:`lost` sends them again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kvstack.operator import autoscale
from kvstack.operator.controller import Evaluation
from kvstack.operator.spec import KVStackSpec
from kvstack.operator.status import all_ready, engines_summary, iso

Obj = dict[str, Any]
ConditionType = Literal["Reconciled", "Ready", "PrometheusReachable", "ScalingActive", "AdaptersReady"]
Reason = Literal[
    "Applied",  # Reconciled: every object applied, the dropped ones pruned
    "ApplyFailed",  # Reconciled: the API refused a write; the handler retries
    "InvalidSpec",  # Reconciled, Ready: the engine loader refuses the spec; nothing applied
    "AllReady",  # Ready
    "Progressing",  # Ready: an engine or the router is not ready yet
    "QuerySucceeded",  # PrometheusReachable
    "QueryFailed",  # PrometheusReachable: the message is the error
    "MetricsUnavailable",  # ScalingActive: Prometheus unreachable, replicas held
    "Disabled",  # ScalingActive: spec.autoscaling.enabled is false
    "NoModels",  # ScalingActive: Prometheus answered, yet no model has a decision to show
    # AdaptersReady (kvstack.operator.lora_report.adapters_ready): models with a lora section only
    "AdaptersLoaded",  # every declared adapter is loaded on the engines placement wants it on
    "AdaptersLoading",  # some are not yet (engines starting, loads in flight, no free slot)
    "AdapterLoadFailed",  # a load or unload failed; the message names the adapters and the errors
]
# ScalingActive while Prometheus answers: the distinct reasons of the last decisions, sorted.
DecisionReasons = tuple[autoscale.Reason, ...]
ApplyResult = Literal["applied", "invalid", "failed"]
MESSAGE_LIMIT = 2000  # ScalingActive joins one message per model


@dataclass(frozen=True, slots=True)
class Condition:
    status: bool
    reason: Reason | DecisionReasons
    message: str = ""
    generation: int | None = None  # observedGeneration: the spec it speaks of; None: no particular one

    @property
    def reason_text(self) -> str:
        """The reason as the resource shows it (decision reasons comma-joined: ``queue,steady``)."""
        return self.reason if isinstance(self.reason, str) else ",".join(self.reason)


Conditions = dict[ConditionType, Condition]


def reconciled(result: ApplyResult, detail: str, generation: int | None) -> Conditions:
    """The conditions an apply of the spec decides; ``detail`` is the error, or what was applied."""
    if result == "applied":
        return {"Reconciled": Condition(True, "Applied", detail, generation)}
    if result == "failed":
        return {"Reconciled": Condition(False, "ApplyFailed", detail, generation)}
    bad = Condition(False, "InvalidSpec", detail, generation)
    return {"Reconciled": bad, "Ready": bad}


def evaluated(seen: Evaluation, spec: KVStackSpec, generation: int | None) -> Conditions:
    """The conditions one evaluation of the stack decides (``Ready`` always, the others as observed)."""
    out: Conditions = {}
    if seen.prometheus_ok is False:
        out["PrometheusReachable"] = Condition(False, "QueryFailed", seen.prometheus_error)
        out["ScalingActive"] = Condition(
            False, "MetricsUnavailable", "holding replicas: Prometheus unreachable"
        )
    elif seen.prometheus_ok:
        out["PrometheusReachable"] = Condition(True, "QuerySucceeded")
        decided = [(m.entry["name"], m.decision) for m in seen.models if m.decision is not None]
        reasons = tuple(sorted({d.reason for _, d in decided}))
        message = "; ".join(f"{name}: {d.message}" for name, d in decided)
        active = reasons != ("metrics_unavailable",)
        out["ScalingActive"] = Condition(active, reasons or "NoModels", message[:MESSAGE_LIMIT])
    elif not spec.autoscaling.enabled:
        out["ScalingActive"] = Condition(False, "Disabled", "spec.autoscaling.enabled is false")
    entries = [m.entry for m in seen.models]
    ready = bool(entries) and len(entries) == len(spec.models) and all_ready(entries)
    if spec.router.enabled:
        # A router Deployment not there yet counts as 0 of 1 ready.
        router = seen.router
        ready = ready and int(router.get("readyReplicas", 0)) >= int(router.get("replicas", 1))
    summary = engines_summary(entries)
    out["Ready"] = Condition(ready, "AllReady" if ready else "Progressing", summary, generation)
    return out


def set_condition(
    conditions: Sequence[Mapping[str, Any]], type_: str, cond: Condition, now: float
) -> list[Obj]:
    """``conditions`` with ``type_`` set; its transition time moves only when its status does."""
    value = "True" if cond.status else "False"
    written: Obj = {
        "type": type_,
        "status": value,
        "reason": cond.reason_text,
        "message": cond.message,
        "lastTransitionTime": iso(now),
        **({"observedGeneration": cond.generation} if cond.generation is not None else {}),
    }
    out: list[Obj] = []
    found = False
    for old in conditions:
        if old.get("type") != type_:
            out.append(dict(old))
            continue
        found = True
        if old.get("status") == value:
            written["lastTransitionTime"] = old.get("lastTransitionTime", iso(now))
        out.append(written)
    if not found:
        out.append(written)
    return out


def render(
    existing: Sequence[Mapping[str, Any]], mine: Mapping[ConditionType, Condition], now: float
) -> list[Obj]:
    """The whole ``status.conditions`` list: ``existing`` with every condition of ``mine`` set."""
    conditions = [dict(c) for c in existing]
    for type_, cond in mine.items():
        conditions = set_condition(conditions, type_, cond, now)
    return conditions


def lost(existing: Sequence[Mapping[str, Any]], mine: Mapping[ConditionType, Condition]) -> bool:
    """Whether ``existing`` lacks or contradicts (status or reason) a condition of ``mine``.

    Another writer's older list replaced ours: the caller renders them all again.
    """
    seen = {c.get("type"): (c.get("status"), c.get("reason")) for c in existing}
    return any(
        seen.get(type_) != ("True" if cond.status else "False", cond.reason_text)
        for type_, cond in mine.items()
    )
