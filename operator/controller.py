"""The operator's I/O: apply what a stack owns, prune what it no longer asks for, evaluate scaling.

Decisions come from pure modules (``resources``, ``autoscale``, ``signals``, ``status``); this module
only reads and writes the API and Prometheus, and returns what the kopf handlers put in status.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from kvstack.operator.autoscale import Decision, History, Observation, decide
from kvstack.operator.kube import OWNED_KINDS, Kube, KubeError
from kvstack.operator.metrics import OperatorMetrics
from kvstack.operator.prom import Prometheus, PrometheusError
from kvstack.operator.resources import Owner, desired_objects, engine_name, key, managed_selector, to_prune
from kvstack.operator.signals import SIGNAL_LABELS, SIGNALS, observation, queries, sustained_idle
from kvstack.operator.spec import KVStackSpec
from kvstack.operator.status import model_entry, policy_for

log = logging.getLogger(__name__)
Obj = dict[str, Any]


async def reconcile(kube: Kube, owner: Owner, spec: KVStackSpec) -> list[tuple[str, str, str]]:
    """Apply every desired object, then delete owned ones the spec dropped; returns what was pruned."""
    desired = desired_objects(owner, spec)  # ConfigError before any write
    for obj in desired:
        await kube.apply(obj)
    existing: list[tuple[str, str, str]] = []
    for api_version, kind in OWNED_KINDS:
        for item in await kube.list(api_version, kind, owner.namespace, managed_selector(owner)):
            refs = item["metadata"].get("ownerReferences") or []
            if any(ref.get("uid") == owner.uid for ref in refs):
                existing.append((api_version, kind, item["metadata"]["name"]))
    pruned = to_prune(existing, desired)
    for api_version, kind, name in pruned:
        await kube.delete(api_version, kind, owner.namespace, name)
    return pruned


@dataclass
class ModelOutcome:
    """One model's evaluation: its status entry and what to tell the world."""

    entry: Obj
    decision: Decision | None = None


@dataclass
class ScalingState:
    """What the autoscaler remembers per model between evaluations (in kopf's per-object memo)."""

    histories: dict[str, History] = field(default_factory=dict)
    idle_since: dict[str, float] = field(default_factory=dict)


@dataclass
class Evaluation:
    models: list[ModelOutcome] = field(default_factory=list)
    prometheus_ok: bool | None = None  # None: autoscaling off, nothing asked
    prometheus_error: str = ""
    router: Obj = field(default_factory=dict)


def _replicas(dep: Obj) -> tuple[int, int]:
    spec_replicas = dep.get("spec", {}).get("replicas")
    current = 1 if spec_replicas is None else int(spec_replicas)
    return current, int(dep.get("status", {}).get("readyReplicas") or 0)


async def evaluate(
    kube: Kube,
    prom: Prometheus | None,
    metrics: OperatorMetrics,
    owner: Owner,
    spec: KVStackSpec,
    state: ScalingState,
    previous: dict[str, Obj],
    scale: bool,
) -> Evaluation:
    """Observe every model; when ``scale``, decide and write replicas through ``/scale``."""
    out = Evaluation()
    auto = spec.autoscaling
    for model in spec.models:
        name = engine_name(owner, model)
        dep = await kube.get("apps/v1", "Deployment", owner.namespace, name)
        if dep is None:
            continue  # not created yet: the next reconcile makes it
        current, ready = _replicas(dep)
        if not (scale and auto.enabled and prom is not None):
            desired = current
            out.models.append(
                ModelOutcome(
                    model_entry(
                        model.name, name, current, ready, desired, None, previous.get(model.name), time.time()
                    )
                )
            )
            continue
        now = time.time()
        served = model.served_names[0]
        q = queries(
            auto.metric,
            owner.namespace,
            served,
            window_s=max(60, 4 * auto.interval_seconds),
            idle_s=auto.scale_to_zero.idle_seconds if auto.scale_to_zero.enabled else None,
        )
        try:
            obs = observation(auto.metric, now, current, await prom.results(q))
            out.prometheus_ok = out.prometheus_ok is not False
        except PrometheusError as err:
            obs = Observation(now, current, None)
            out.prometheus_ok, out.prometheus_error = False, str(err)
            metrics.error(owner.namespace, served, "query", now)
        idle, since = sustained_idle(
            obs.idle, state.idle_since.get(model.name), now, auto.scale_to_zero.idle_seconds
        )
        state.idle_since.pop(model.name, None)
        if since is not None:
            state.idle_since[model.name] = since
        obs = replace(obs, idle=idle)
        decision = decide(policy_for(auto, model), obs, state.histories.get(model.name, ()))
        state.histories[model.name] = decision.history
        if decision.replicas != current:
            try:
                await kube.scale(owner.namespace, name, decision.replicas)
            except KubeError as err:
                log.warning("scaling %s/%s to %d failed: %s", owner.namespace, name, decision.replicas, err)
                metrics.error(owner.namespace, served, "apply", now)
                decision = Decision(
                    current,
                    "none",
                    decision.reason,
                    f"{decision.message}; apply failed: {err}",
                    decision.history,
                )
        signal = (SIGNAL_LABELS[SIGNALS[auto.metric]], obs.value) if obs.value is not None else None
        metrics.record(owner.namespace, served, decision, current, ready, signal, now)
        entry = model_entry(
            model.name, name, current, ready, decision.replicas, decision, previous.get(model.name), now
        )
        out.models.append(ModelOutcome(entry, decision))
    router = await kube.get("apps/v1", "Deployment", owner.namespace, f"{owner.name}-router")
    if router is not None:
        current, ready = _replicas(router)
        selector = router["spec"]["selector"]["matchLabels"]
        out.router = {
            "replicas": current,
            "readyReplicas": ready,
            "selector": ",".join(f"{k}={v}" for k, v in sorted(selector.items())),
        }
    return out


__all__ = ["Evaluation", "ModelOutcome", "ScalingState", "evaluate", "key", "reconcile"]
