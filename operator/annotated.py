"""Engine Deployments that ask for autoscaling by annotation (the Helm chart's): parsing and memory. Pure.

The chart renders, on each engine Deployment of a release with ``engines.autoscaling.enabled``::

    kvstack.dev/autoscaling: "true"
    kvstack.dev/min-replicas: "1"
    kvstack.dev/max-replicas: "4"
    kvstack.dev/autoscaling-policy: '{"metric": "waitingPerReplica", "target": 5, ...}'

The policy is a ``KVStack``'s ``spec.autoscaling`` (camelCase JSON, the same model and defaults);
the served model name, which the Prometheus queries select by, comes from
``kvstack.dev/served-model-names`` on the pod template (as the chart renders it) or the Deployment.
No custom resource holds status, so the recommendation history the stabilization windows need and
the last decision live in ``kvstack.dev/autoscaling-status`` (JSON) on the Deployment itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvstack.common.config import ConfigError, build, comma_list
from kvstack.operator.autoscale import History, Policy
from kvstack.operator.crd import GROUP, KIND
from kvstack.operator.spec import Autoscaling
from kvstack.operator.status import policy_from

AUTOSCALING = f"{GROUP}/autoscaling"
MIN_REPLICAS = f"{GROUP}/min-replicas"
MAX_REPLICAS = f"{GROUP}/max-replicas"
POLICY = f"{GROUP}/autoscaling-policy"
STATUS = f"{GROUP}/autoscaling-status"
SERVED_NAMES = f"{GROUP}/served-model-names"
Obj = dict[str, Any]


class AnnotationPolicy(Autoscaling):
    """``spec.autoscaling`` of a KVStack; ``kvstack.dev/autoscaling`` is the switch, so never off here."""

    enabled: Literal[True] = True


class Bounds(BaseModel):
    """The replica bounds, read from their own annotations."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    min_replicas: int = Field(1, ge=0, le=1000, alias=MIN_REPLICAS)
    max_replicas: int = Field(4, ge=1, le=1000, alias=MAX_REPLICAS)

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"{MIN_REPLICAS} ({self.min_replicas}) is above {MAX_REPLICAS} ({self.max_replicas})"
            )
        return self


@dataclass(frozen=True, slots=True)
class Annotated:
    """One annotated Deployment, parsed."""

    namespace: str
    name: str
    model_name: str
    autoscaling: Autoscaling
    bounds: Bounds

    @property
    def policy(self) -> Policy:
        return policy_from(self.autoscaling, self.bounds.min_replicas, self.bounds.max_replicas)


def wants_autoscaling(meta: Mapping[str, Any]) -> bool:
    """Annotated ``kvstack.dev/autoscaling: "true"`` and not owned by a KVStack (those scale with it)."""
    annotations = meta.get("annotations") or {}
    if str(annotations.get(AUTOSCALING, "")).strip().lower() != "true":
        return False
    refs = meta.get("ownerReferences") or []
    return not any(
        r.get("kind") == KIND and str(r.get("apiVersion", "")).startswith(f"{GROUP}/") for r in refs
    )


def _model_name(deployment: Mapping[str, Any]) -> str | None:
    template = (deployment.get("spec", {}).get("template", {}).get("metadata") or {}).get("annotations") or {}
    own = deployment.get("metadata", {}).get("annotations") or {}
    for source in (template, own):
        names = comma_list(str(source.get(SERVED_NAMES, "")))
        if names:
            return names[0]  # vLLM labels its series with the first served name
    return None


def parse(deployment: Mapping[str, Any]) -> Annotated:
    """The Deployment's autoscaling, or ConfigError naming the bad annotation and field."""
    meta = deployment.get("metadata", {})
    where = f"Deployment {meta.get('namespace')}/{meta.get('name')}"
    annotations: Mapping[str, Any] = meta.get("annotations") or {}
    bounds = build(
        Bounds,
        f"replica bounds of {where}",
        **{k: annotations[k] for k in (MIN_REPLICAS, MAX_REPLICAS) if k in annotations},
    )
    raw = annotations.get(POLICY, "{}")
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise ConfigError(f"invalid {POLICY} of {where}: not JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {POLICY} of {where}: a JSON object is needed, not {type(data).__name__}")
    policy = build(AnnotationPolicy, f"{POLICY} of {where}", **data)
    model_name = _model_name(deployment)
    if model_name is None:
        raise ConfigError(
            f"invalid autoscaling of {where}: {SERVED_NAMES} is on neither the pod template nor the "
            "Deployment; the Prometheus queries select engines by the served model name"
        )
    return Annotated(str(meta.get("namespace", "")), str(meta.get("name", "")), model_name, policy, bounds)


@dataclass(frozen=True, slots=True)
class Memory:
    """What one evaluation leaves for the next, in ``kvstack.dev/autoscaling-status``."""

    history: History = ()
    idle_since: float | None = None
    prometheus_reachable: bool | None = None
    # ``status.model_entry`` of the last evaluation: replicas, lastDecision, lastScale, lastScaleTime.
    entry: Obj = field(default_factory=dict)


def compact(history: History) -> History:
    """The latest recommendation per replica count, oldest first.

    Exact for the stabilization windows: an older entry of the same count leaves any window no
    later than the newer one, so the minimum and maximum over a window never depend on it. It
    bounds the annotation by ``maxReplicas`` entries whatever the interval and windows.
    """
    latest: dict[int, float] = {}
    for t, replicas in history:
        latest[replicas] = max(t, latest.get(replicas, t))
    return tuple(sorted(((t, r) for r, t in latest.items()), key=lambda e: (e[0], e[1])))


def dump_memory(memory: Memory) -> str:
    body: Obj = {
        **{k: v for k, v in memory.entry.items() if k not in ("name", "deployment")},
        "history": [[round(t, 3), r] for t, r in compact(memory.history)],
    }
    if memory.idle_since is not None:
        body["idleSince"] = round(memory.idle_since, 3)
    if memory.prometheus_reachable is not None:
        body["prometheusReachable"] = memory.prometheus_reachable
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def load_memory(annotations: Mapping[str, Any] | None) -> Memory:
    """The memory an earlier evaluation wrote; anything unreadable counts as none (a fresh start
    is safe: the decision then treats the current size as its only recommendation)."""
    raw = (annotations or {}).get(STATUS)
    try:
        body = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return Memory()
    try:
        history = tuple((float(t), int(r)) for t, r in body.get("history") or [])
        idle = body.get("idleSince")
        idle_since = None if idle is None else float(idle)
    except (TypeError, ValueError):
        return Memory()
    reachable = body.get("prometheusReachable")
    entry = {k: v for k, v in body.items() if k not in ("history", "idleSince", "prometheusReachable")}
    return Memory(history, idle_since, reachable if isinstance(reachable, bool) else None, entry)
