"""The operator's I/O: apply what a stack owns, prune what it no longer asks for, evaluate scaling.

Decisions come from pure modules (``resources``, ``autoscale``, ``signals``, ``status``); this module
only reads and writes the API and Prometheus, and returns what :mod:`kvstack.operator.stack` turns
into status (and the annotated Deployments' scaler into its annotation).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

from kvstack.operator.autoscale import Decision, History, Observation, Policy, decide
from kvstack.operator.kube import OWNED_KINDS, Kube, KubeError
from kvstack.operator.metrics import OperatorMetrics
from kvstack.operator.ownership import Owner, engine_name, key, managed_selector, to_prune
from kvstack.operator.prom import Prometheus, PrometheusError
from kvstack.operator.resources import desired_objects
from kvstack.operator.signals import SIGNAL_LABELS, SIGNALS, observation, queries, sustained_idle
from kvstack.operator.spec import Autoscaling, KVStackSpec
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
    """What the autoscaler remembers per model between evaluations (in the stack's ``StackMemory``)."""

    histories: dict[str, History] = field(default_factory=dict)
    idle_since: dict[str, float] = field(default_factory=dict)


@dataclass
class Evaluation:
    models: list[ModelOutcome] = field(default_factory=list)
    prometheus_ok: bool | None = None  # None: autoscaling off, nothing asked
    prometheus_error: str = ""
    router: Obj = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Target:
    """One autoscaled engine Deployment: where it is, what its engines serve, how it scales."""

    namespace: str
    deployment: str
    model_name: str  # the first served name: vLLM's ``model_name`` label
    autoscaling: Autoscaling
    policy: Policy


@dataclass(frozen=True, slots=True)
class Scaled:
    """One evaluation of one Target: the decision (already written) and what to remember."""

    decision: Decision
    observation: Observation
    idle_since: float | None
    prometheus_error: str | None  # None: Prometheus answered


def replicas_of(dep: Obj) -> tuple[int | None, int]:
    """``(spec.replicas or None when unset, status.readyReplicas)`` of a Deployment."""
    spec_replicas = dep.get("spec", {}).get("replicas")
    return (None if spec_replicas is None else int(spec_replicas)), int(
        dep.get("status", {}).get("readyReplicas") or 0
    )


def _replicas(dep: Obj) -> tuple[int, int]:
    spec_replicas, ready = replicas_of(dep)
    return (1 if spec_replicas is None else spec_replicas), ready


async def scale_model(
    kube: Kube,
    prom: Prometheus,
    metrics: OperatorMetrics,
    target: Target,
    current: int,
    ready: int,
    history: History,
    idle_since: float | None,
    *,
    write_unchanged: bool = False,
) -> Scaled:
    """Ask Prometheus, decide, write replicas through ``/scale``, record the metrics.

    The one evaluation of a model, shared by ``KVStack`` models and annotated Deployments.
    ``write_unchanged`` writes the replicas even when they do not change (a Deployment without
    ``spec.replicas``).
    """
    auto, served, ns = target.autoscaling, target.model_name, target.namespace
    now = time.time()
    q = queries(
        auto.metric,
        ns,
        served,
        window_s=max(60, 4 * auto.interval_seconds),
        idle_s=auto.scale_to_zero.idle_seconds if auto.scale_to_zero.enabled else None,
        resolution_s=auto.interval_seconds,
    )
    error: str | None = None
    try:
        obs = observation(auto.metric, now, current, await prom.results(q))
    except PrometheusError as err:
        obs, error = Observation(now, current, None), str(err)
        metrics.error(ns, served, "query", now)
    idle, since = sustained_idle(obs.idle, idle_since, now, auto.scale_to_zero.idle_seconds)
    obs = replace(obs, idle=idle)
    decision = decide(target.policy, obs, history)
    if decision.replicas != current or write_unchanged:
        try:
            await kube.scale(ns, target.deployment, decision.replicas)
        except KubeError as err:
            log.warning("scaling %s/%s to %d failed: %s", ns, target.deployment, decision.replicas, err)
            metrics.error(ns, served, "apply", now)
            decision = Decision(
                current, "none", decision.reason, f"{decision.message}; apply failed: {err}", decision.history
            )
    signal = (SIGNAL_LABELS[SIGNALS[auto.metric]], obs.value) if obs.value is not None else None
    metrics.record(ns, served, decision, current, ready, signal, now)
    return Scaled(decision, obs, since, error)


async def evaluate(
    kube: Kube,
    prom: Prometheus | None,
    metrics: OperatorMetrics,
    owner: Owner,
    spec: KVStackSpec,
    state: ScalingState,
    previous: dict[str, Obj],
) -> Evaluation:
    """Observe every model; with autoscaling on (``prom`` given), decide and scale it through ``/scale``.

    ``state`` carries each model's recommendation history and idle start from one evaluation to the
    next; ``previous`` is each model's last status entry (its last decision and scale are kept).
    """
    out = Evaluation()
    auto = spec.autoscaling
    for model in spec.models:
        name = engine_name(owner, model)
        dep = await kube.get("apps/v1", "Deployment", owner.namespace, name)
        if dep is None:
            continue  # not created yet: the next reconcile makes it
        current, ready = _replicas(dep)
        if not (auto.enabled and prom is not None):
            desired = current
            out.models.append(
                ModelOutcome(
                    model_entry(
                        model.name, name, current, ready, desired, None, previous.get(model.name), time.time()
                    )
                )
            )
            continue
        target = Target(owner.namespace, name, model.served_names[0], auto, policy_for(auto, model))
        scaled = await scale_model(
            kube,
            prom,
            metrics,
            target,
            current,
            ready,
            state.histories.get(model.name, ()),
            state.idle_since.get(model.name),
        )
        if scaled.prometheus_error is None:
            out.prometheus_ok = out.prometheus_ok is not False
        else:
            out.prometheus_ok, out.prometheus_error = False, scaled.prometheus_error
        state.idle_since.pop(model.name, None)
        if scaled.idle_since is not None:
            state.idle_since[model.name] = scaled.idle_since
        decision = scaled.decision
        state.histories[model.name] = decision.history
        entry = model_entry(
            model.name,
            name,
            current,
            ready,
            decision.replicas,
            decision,
            previous.get(model.name),
            scaled.observation.now,
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


__all__ = [
    "Evaluation",
    "ModelOutcome",
    "Scaled",
    "ScalingState",
    "Target",
    "evaluate",
    "key",
    "reconcile",
    "replicas_of",
    "scale_model",
]
