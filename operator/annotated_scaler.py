"""Autoscaling of annotated engine Deployments (the Helm chart's), outside any ``KVStack``.

kopf tells :meth:`AnnotatedScaler.observe` about every Deployment in the watched namespaces (a
watch handler, which adds no finalizer); :meth:`AnnotatedScaler.run` evaluates each annotated one
every ``intervalSeconds`` with the same :func:`kvstack.operator.controller.scale_model` that
``KVStack`` models use, and keeps what the next evaluation needs in an annotation
(:mod:`kvstack.operator.annotated`).

Not a kopf timer: kopf puts a finalizer on every object a timer runs for, and a finalizer on a
Deployment that Helm owns would hold ``helm uninstall`` (which removes the operator at the same
time) and the namespace's deletion forever.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kvstack.common.config import ConfigError
from kvstack.operator.annotated import STATUS, Memory, dump_memory, load_memory, parse, wants_autoscaling
from kvstack.operator.controller import Target, replicas_of, scale_model
from kvstack.operator.deployment_rounds import DeploymentRounds, Key
from kvstack.operator.runtime import Runtime
from kvstack.operator.status import model_entry

log = logging.getLogger(__name__)


class AnnotatedScaler(DeploymentRounds):
    """The annotated Deployments kopf has seen, and when each is next evaluated."""

    round_name = "evaluating"

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self._model_names: dict[Key, str] = {}
        self._reported: dict[Key, str] = {}  # the last bad-annotation message posted, per Deployment

    def observe(self, event_type: str | None, body: Any) -> None:
        """A watch event of a Deployment: start or stop tracking it."""
        meta = body.get("metadata", {})
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        if event_type == "DELETED" or not wants_autoscaling(meta):
            self._forget(key)
        elif key not in self._due:
            log.info("autoscaling Deployment %s/%s from its annotations", *key)
            self._due[key] = 0.0  # evaluate at once

    def _forget(self, key: Key) -> None:
        if self._due.pop(key, None) is not None:
            log.info("no longer autoscaling Deployment %s/%s", *key)
        self._reported.pop(key, None)
        model_name = self._model_names.pop(key, None)
        if model_name is not None:
            self._runtime.metrics.forget(key[0], model_name)

    async def evaluate(self, key: Key) -> None:
        """One evaluation of one annotated Deployment: decide, scale, remember, tell."""
        kube = self._runtime.kube
        assert kube is not None
        namespace, name = key
        dep = await kube.get("apps/v1", "Deployment", namespace, name)
        if dep is None or not wants_autoscaling(dep.get("metadata", {})):
            self._forget(key)
            return
        try:
            annotated = parse(dep)
        except ConfigError as err:
            message = str(err)
            if self._reported.get(key) != message:
                # Once per distinct problem: the Event says what to fix; replicas stay as they are.
                log.error("not scaling %s/%s: %s", namespace, name, message)
                await self._tell(dep, True, "InvalidAutoscalingPolicy", message)
                self._reported[key] = message
            return
        self._reported.pop(key, None)
        auto = annotated.autoscaling
        self._due[key] = time.time() + auto.interval_seconds
        self._model_names[key] = annotated.model_name
        annotations = dep["metadata"].get("annotations") or {}
        memory = load_memory(annotations)
        spec_replicas, ready = replicas_of(dep)
        # The chart renders no replicas: the API server defaults them to 1, and /scale writes them.
        current = (
            spec_replicas if spec_replicas is not None else int(dep.get("status", {}).get("replicas") or 1)
        )
        target = Target(namespace, name, annotated.model_name, auto, annotated.policy)
        prom = self._runtime.prometheus(auto.prometheus_url)
        scaled = await scale_model(
            kube,
            prom,
            self._runtime.metrics,
            target,
            current,
            ready,
            memory.history,
            memory.idle_since,
            write_unchanged=spec_replicas is None,
        )
        reachable = scaled.prometheus_error is None
        self._runtime.metrics.prometheus_up.set(1 if reachable else 0)
        if not reachable and memory.prometheus_reachable is not False:
            log.warning("holding %s/%s at %d: %s", namespace, name, current, scaled.prometheus_error)
            await self._tell(
                dep, True, "PrometheusUnreachable", f"holding replicas: {scaled.prometheus_error}"
            )
        elif reachable and memory.prometheus_reachable is False:
            log.info("Prometheus answers again for %s/%s", namespace, name)
        d = scaled.decision
        if d.changed:
            text = f"{current} -> {d.replicas} ({d.reason}): {d.message}"
            log.info("scaled %s/%s %s", namespace, name, text)
            await self._tell(dep, False, "ScaledUp" if d.direction == "up" else "ScaledDown", text)
        now = scaled.observation.now
        entry = model_entry(annotated.model_name, name, current, ready, d.replicas, d, memory.entry, now)
        remembered = Memory(d.history, scaled.idle_since, reachable, entry)
        await kube.annotate(namespace, name, {STATUS: dump_memory(remembered)})
