"""Pure helpers for the ``KVStack`` status: per-model entries, the printer summary, each model's policy.

The conditions are decided in :mod:`kvstack.operator.conditions`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from kvstack.operator.autoscale import Decision, Policy
from kvstack.operator.signals import SIGNALS
from kvstack.operator.spec import Autoscaling, Model

Obj = dict[str, Any]


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def policy_for(autoscaling: Autoscaling, model: Model) -> Policy:
    """The decision function's policy of one model."""
    return policy_from(autoscaling, model.min_replicas, model.max_replicas)


def policy_from(autoscaling: Autoscaling, min_replicas: int, max_replicas: int) -> Policy:
    """The decision function's policy for an autoscaling spec and replica bounds."""
    return Policy(
        signal=SIGNALS[autoscaling.metric],
        target=autoscaling.effective_target,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        tolerance=autoscaling.tolerance,
        up_window_s=autoscaling.scale_up.stabilization_seconds,
        down_window_s=autoscaling.scale_down.stabilization_seconds,
        up_max_percent=autoscaling.scale_up.max_percent,
        up_max_pods=autoscaling.scale_up.max_pods,
        down_max_pods=autoscaling.scale_down.max_pods,
        stale_after_s=autoscaling.stale_after_seconds,
        scale_to_zero=autoscaling.scale_to_zero.enabled and min_replicas == 0,
    )


def model_entry(
    name: str,
    deployment: str,
    current: int,
    ready: int,
    desired: int,
    decision: Decision | None,
    previous: Mapping[str, Any] | None,
    now: float,
) -> Obj:
    """One ``status.models[]`` entry: the last evaluation's decision, and the last one that scaled."""
    entry: Obj = {
        "name": name,
        "deployment": deployment,
        "desiredReplicas": desired,
        "currentReplicas": current,
        "readyReplicas": ready,
    }
    previous = previous or {}
    if decision is not None:
        entry["lastDecision"] = {
            "time": iso(now),
            "direction": decision.direction,
            "reason": decision.reason,
            "message": decision.message[:1000],
            "fromReplicas": current,
            "toReplicas": decision.replicas,
        }
    elif "lastDecision" in previous:
        entry["lastDecision"] = previous["lastDecision"]
    if decision is not None and decision.changed:
        entry["lastScaleTime"] = iso(now)
        entry["lastScale"] = entry["lastDecision"]
    else:
        for kept in ("lastScaleTime", "lastScale"):
            if kept in previous:
                entry[kept] = previous[kept]
    return entry


def engines_summary(entries: Sequence[Mapping[str, Any]]) -> str:
    """``ready/desired`` over all models, for the printer column."""
    ready = sum(int(e.get("readyReplicas", 0)) for e in entries)
    desired = sum(int(e.get("desiredReplicas", 0)) for e in entries)
    return f"{ready}/{desired}"


def all_ready(entries: Sequence[Mapping[str, Any]]) -> bool:
    """Every model has as many ready engines as it wants (0 wanted counts as ready: scaled to zero)."""
    return all(int(e.get("readyReplicas", 0)) >= int(e.get("desiredReplicas", 0)) for e in entries)
