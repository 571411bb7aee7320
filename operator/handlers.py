"""Thin kopf handlers: parse the spec, call the controller, write status, events and metrics.

:func:`build_registry` makes a fresh ``kopf.OperatorRegistry`` bound to one :class:`Runtime`, so a
test can run an operator in-process with its own metrics registry and settings.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import kopf

from kvstack.common.config import ConfigError
from kvstack.operator.annotated_scaler import AnnotatedScaler
from kvstack.operator.annotated_scaler import stop as stop_scaling
from kvstack.operator.controller import ScalingState, evaluate, reconcile
from kvstack.operator.crd import GROUP, PLURAL, VERSION
from kvstack.operator.kube import Kube, KubeError, kopf_login
from kvstack.operator.metrics import OperatorMetrics
from kvstack.operator.ownership import Owner
from kvstack.operator.prom import Prometheus
from kvstack.operator.settings import OperatorSettings
from kvstack.operator.spec import KVStackSpec, parse_spec
from kvstack.operator.status import all_ready, engines_summary, set_condition

RESOURCE = (GROUP, VERSION, PLURAL)
# (status, reason, message, observedGeneration) of one condition.
Condition = tuple[bool, str, str, "int | None"]


@dataclass
class Runtime:
    """What every handler shares: clients, metrics, settings."""

    settings: OperatorSettings
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    kube: Kube | None = None
    proms: dict[str, Prometheus] = field(default_factory=dict)
    stop_metrics: Callable[[], None] | None = None
    scaling_task: asyncio.Task[None] | None = None  # the annotated Deployments' evaluation loop
    closing: bool = False  # set first by close(): a timer mid-request then ends quietly

    def prometheus(self, url: str | None) -> Prometheus:
        base = url or self.settings.prometheus_url
        if base not in self.proms:
            self.proms[base] = Prometheus(base, timeout=self.settings.prometheus_timeout_s)
        return self.proms[base]

    async def close(self) -> None:
        self.closing = True
        await stop_scaling(self.scaling_task)
        self.scaling_task = None
        for prom in self.proms.values():
            await prom.aclose()
        self.proms.clear()
        if self.kube is not None:
            await self.kube.aclose()
            self.kube = None
        if self.stop_metrics is not None:
            self.stop_metrics()
            self.stop_metrics = None


TRACK_ID = "track-deployments"


class _QuietTracking(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != f"Handler '{TRACK_ID}' succeeded."


def _lock(memo: Any) -> asyncio.Lock:
    """One reconcile at a time per stack (the change handlers and the timer run concurrently)."""
    lock: asyncio.Lock = memo.setdefault("lock", asyncio.Lock())
    return lock


def _owner(name: str, namespace: str | None, uid: str) -> Owner:
    assert name and namespace and uid
    return Owner(name=name, namespace=namespace, uid=uid)


def build_registry(runtime: Runtime) -> kopf.OperatorRegistry:
    """Every handler of the operator, registered on a new registry."""
    registry = kopf.OperatorRegistry()
    s = runtime.settings
    scaler = AnnotatedScaler(runtime)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Progress and the last-handled spec live in annotations: status stays ours and schema-clean.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        settings.posting.loggers = False  # log lines stay logs; decisions and problems post their own Events
        # Watching named namespaces, the operator holds only namespaced RBAC (the chart's Role): kopf's
        # cluster-wide scan of CRDs and namespaces would fail nine times per start, then do without.
        settings.scanning.disabled = bool(s.watched_namespaces())
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call is noise
        # kopf logs each handled watch event; every Deployment change (our own state writes too)
        # would add a line. The scaler logs what matters: start, stop, decisions, problems.
        kopf_objects = logging.getLogger("kopf.objects")
        if not any(isinstance(f, _QuietTracking) for f in kopf_objects.filters):
            kopf_objects.addFilter(_QuietTracking())
        runtime.kube = Kube.from_environment(s.kubeconfig, s.context)
        if s.metrics_port:
            runtime.stop_metrics = runtime.metrics.serve(s.metrics_port, s.metrics_host)
        runtime.scaling_task = asyncio.create_task(scaler.run(), name="kvstack-annotated-autoscaling")

    @kopf.on.login(registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        return await kopf_login(s.kubeconfig, s.context)  # the credentials runtime.kube uses

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await runtime.close()

    # Every Deployment in the watched namespaces: the chart's engines ask for autoscaling by
    # annotation. A watch handler adds no finalizer to objects Helm owns (a timer would).
    @kopf.on.event("apps", "v1", "deployments", id=TRACK_ID, registry=registry)
    async def track(*, type: str | None, body: kopf.Body, **_: Any) -> None:
        scaler.observe(type, body)  # async: on the loop's thread, as the evaluation loop is

    @kopf.on.resume(*RESOURCE, registry=registry)
    @kopf.on.create(*RESOURCE, registry=registry)
    @kopf.on.update(*RESOURCE, field="spec", registry=registry)
    async def apply_spec(
        *,
        body: kopf.Body,
        spec: kopf.Spec,
        name: str,
        namespace: str | None,
        uid: str,
        meta: kopf.Meta,
        status: kopf.Status,
        patch: kopf.Patch,
        memo: Any,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        **_: Any,
    ) -> None:
        owner = _owner(name, namespace, uid)
        generation = meta.get("generation")
        now = time.time()
        try:
            parsed = parse_spec(dict(spec), f"KVStack {namespace}/{name}")
            assert runtime.kube is not None
            async with _lock(memo):
                pruned = await reconcile(runtime.kube, owner, parsed)
                memo["applied_generation"] = generation
        except ConfigError as err:
            # A spec the engine loader refuses: nothing to retry until someone edits it.
            logger.error("%s", err)
            kopf.warn(body, reason="InvalidSpec", message=str(err)[:1000])
            memo["invalid"] = True
            bad = (False, "InvalidSpec", str(err), generation)
            write_conditions(patch, status, memo, now, {"Reconciled": bad, "Ready": bad})
            patch.status["observedGeneration"] = generation
            return
        except KubeError as err:
            failed = (False, "ApplyFailed", str(err), generation)
            write_conditions(patch, status, memo, now, {"Reconciled": failed})
            raise kopf.TemporaryError(f"applying the stack's objects failed: {err}", delay=10) from err
        memo["invalid"] = False
        memo["next_resync"] = now + s.resync_seconds
        memo["next_evaluation"] = now  # observe at once
        if pruned:
            logger.info("pruned %s", ", ".join(f"{kind}/{n}" for _, kind, n in pruned))
        applied = (True, "Applied", f"{len(parsed.models)} models applied", generation)
        write_conditions(patch, status, memo, now, {"Reconciled": applied})
        patch.status["observedGeneration"] = generation

    @kopf.on.delete(*RESOURCE, registry=registry, optional=True)
    async def forget(spec: Any, namespace: str | None, **_: Any) -> None:
        # Owned objects go with the stack through their ownerReferences; only our series stay behind.
        try:
            parsed = parse_spec(dict(spec))
        except ConfigError:
            return
        for model in parsed.models:
            runtime.metrics.forget(namespace or "", model.served_names[0])

    # A failure the tick does not handle retries soon (kopf's default backoff is 60 s).
    @kopf.timer(*RESOURCE, interval=s.tick_seconds, backoff=5 * s.tick_seconds, registry=registry)
    async def tick(
        *,
        body: kopf.Body,
        spec: kopf.Spec,
        name: str,
        namespace: str | None,
        uid: str,
        meta: kopf.Meta,
        status: kopf.Status,
        patch: kopf.Patch,
        memo: Any,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        **_: Any,
    ) -> None:
        now = time.time()
        try:
            parsed = parse_spec(dict(spec))
        except ConfigError:
            return  # apply_spec reported it
        if _conditions_lost(status, memo):
            # Another writer's older list replaced ours (a merge patch replaces lists): resend.
            write_conditions(patch, status, memo, now, {})
        if memo.get("invalid"):
            return
        owner = _owner(name, namespace, uid)
        if runtime.kube is None:
            return  # shutting down: cleanup closed the client
        if now >= memo.get("next_resync", now + s.resync_seconds):
            memo["next_resync"] = now + s.resync_seconds
            try:
                async with _lock(memo):
                    # A timer may hold a body older than the one the change handler just applied:
                    # re-applying it would bring back what that handler pruned.
                    if (meta.get("generation") or 0) >= (memo.get("applied_generation") or 0):
                        await reconcile(runtime.kube, owner, parsed)
            except (KubeError, ConfigError) as err:
                logger.warning("resync failed: %s", err)
        if now < memo.get("next_evaluation", 0.0):
            return
        memo["next_evaluation"] = now + parsed.autoscaling.interval_seconds
        try:
            await _evaluate(runtime, owner, parsed, body, status, meta, patch, memo, now)
        except KubeError as err:
            logger.warning("evaluation failed, retrying at the next interval: %s", err)
        except httpx.TransportError:
            if runtime.closing:
                return  # cleanup closed the clients under this request: the operator is stopping
            raise

    return registry


async def _evaluate(
    runtime: Runtime,
    owner: Owner,
    spec: KVStackSpec,
    body: Any,
    status: Any,
    meta: Any,
    patch: kopf.Patch,
    memo: kopf.Memo,
    now: float,
) -> None:
    assert runtime.kube is not None
    auto = spec.autoscaling
    state: ScalingState = memo.setdefault("scaling", ScalingState())
    previous = {str(m.get("name")): m for m in (status.get("models") or []) if isinstance(m, dict)}
    prom = runtime.prometheus(auto.prometheus_url) if auto.enabled else None
    result = await evaluate(runtime.kube, prom, runtime.metrics, owner, spec, state, previous, scale=True)
    if result.prometheus_ok is not None:
        runtime.metrics.prometheus_up.set(1 if result.prometheus_ok else 0)

    entries = [m.entry for m in result.models]
    generation = meta.get("generation")
    for outcome in result.models:
        d = outcome.decision
        if d is not None and d.changed:
            kind = "ScaledUp" if d.direction == "up" else "ScaledDown"
            e = outcome.entry
            text = f"{e['name']}: {e['currentReplicas']} -> {d.replicas} ({d.reason}): {d.message}"
            kopf.info(body, reason=kind, message=text[:1000])
    updates: dict[str, Condition] = {}
    if result.prometheus_ok is False:
        was = memo.get("conditions", {}).get("PrometheusReachable")
        if was is None or was[0]:
            kopf.warn(body, reason="PrometheusUnreachable", message=result.prometheus_error[:1000])
        updates["PrometheusReachable"] = (False, "QueryFailed", result.prometheus_error, None)
        held = "holding replicas: Prometheus unreachable"
        updates["ScalingActive"] = (False, "MetricsUnavailable", held, None)
    elif result.prometheus_ok:
        updates["PrometheusReachable"] = (True, "QuerySucceeded", "", None)
        reasons = sorted({m.decision.reason for m in result.models if m.decision is not None})
        active = reasons != ["metrics_unavailable"]
        message = "; ".join(f"{m.entry['name']}: {m.decision.message}" for m in result.models if m.decision)
        updates["ScalingActive"] = (active, ",".join(reasons) or "NoModels", message[:2000], None)
    elif not auto.enabled:
        updates["ScalingActive"] = (False, "Disabled", "spec.autoscaling.enabled is false", None)
    ready = all_ready(entries) and bool(entries) and len(entries) == len(spec.models)
    router = result.router
    if spec.router.enabled:
        ready = ready and int(router.get("readyReplicas", 0)) >= int(router.get("replicas", 1))
    summary = engines_summary(entries)
    updates["Ready"] = (ready, "AllReady" if ready else "Progressing", summary, generation)
    write_conditions(patch, status, memo, now, updates)
    patch.status["models"] = entries
    patch.status["engines"] = summary
    if router:
        patch.status["router"] = router


def _conditions_lost(status: kopf.Status, memo: Any) -> bool:
    """Whether status lacks (or contradicts) a condition this process has set."""
    seen = {c.get("type"): (c.get("status"), c.get("reason")) for c in status.get("conditions") or []}
    mine: dict[str, Condition] = memo.get("conditions", {})
    return any(seen.get(t) != ("True" if ok else "False", reason) for t, (ok, reason, _, _) in mine.items())


def write_conditions(
    patch: kopf.Patch, status: kopf.Status, memo: Any, now: float, updates: dict[str, Condition]
) -> None:
    """Write every condition this process knows, not only ``updates``.

    Handlers and the timer patch status separately and a merge patch replaces the whole list, so
    each writer sends all conditions from the per-object memo (always current), never only its own
    on top of a ``status`` that may be a moment old.
    """
    mine: dict[str, Condition] = memo.setdefault("conditions", {})
    mine.update(updates)
    conditions = list(status.get("conditions") or [])
    for type_, (ok, reason, message, generation) in mine.items():
        conditions = set_condition(conditions, type_, ok, reason, message, now, generation)
    patch.status["conditions"] = conditions
