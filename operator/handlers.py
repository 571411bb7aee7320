"""The kopf handlers: module-level functions that unpack kopf's arguments, call :mod:`stack` and write.

Each handler is a few lines: what a ``KVStack`` needs is decided and done in
:mod:`kvstack.operator.stack` (and the annotated Deployments' in
:mod:`kvstack.operator.annotated_scaler`); a handler only writes the :class:`~stack.StatusChange`
it gets back into the resource's status and Events.

:func:`build_registry` registers them on a fresh ``kopf.OperatorRegistry`` with one
:class:`~kvstack.operator.runtime.Runtime` bound as their first argument, ``shared`` (kopf accepts
partials and names each handler after its function), so a test can run an operator in-process with
its own metrics registry and settings, and the timer's interval comes from those settings. The
argument is not called ``runtime``: kopf passes every handler a ``runtime`` of its own (how long
the handler has been running), which would collide with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import kopf

from kvstack.operator import stack
from kvstack.operator.annotated_scaler import AnnotatedScaler
from kvstack.operator.conditions import render
from kvstack.operator.crd import GROUP, PLURAL, VERSION
from kvstack.operator.kube import kopf_login
from kvstack.operator.lora_annotated import AnnotatedLora
from kvstack.operator.ownership import Owner
from kvstack.operator.runtime import Runtime
from kvstack.operator.stack import StackMemory, StatusChange

RESOURCE = (GROUP, VERSION, PLURAL)
TRACK_ID = "track-deployments"
MEMORY_KEY = "kvstack"  # the StackMemory's key in kopf's per-object memo


class _QuietTracking(logging.Filter):
    """Drops kopf's line per handled Deployment watch event (our own state writes are events too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != f"Handler '{TRACK_ID}' succeeded."


def _memory(memo: kopf.Memo) -> StackMemory:
    if MEMORY_KEY not in memo:
        memo[MEMORY_KEY] = StackMemory()
    memory: StackMemory = memo[MEMORY_KEY]
    return memory


@dataclass(frozen=True, slots=True)
class _Stack:
    """One ``KVStack`` as kopf hands it to a resource handler: the object, where the handler writes,
    and what this process remembers of it."""

    body: kopf.Body
    spec: kopf.Spec
    owner: Owner
    generation: int | None
    status: kopf.Status
    patch: kopf.Patch
    memory: StackMemory
    logger: stack.Logger

    def write(self, change: StatusChange, now: float) -> None:
        """Post the change's Events; patch its fields and every condition this process has set."""
        for notice in change.notices:
            message = notice.message[: stack.EVENT_MESSAGE_LIMIT]
            (kopf.warn if notice.warning else kopf.info)(self.body, reason=notice.reason, message=message)
        self.memory.conditions.update(change.conditions)
        conditions = render(self.status.get("conditions") or [], self.memory.conditions, now)
        self.patch.status["conditions"] = conditions
        for key, value in change.fields.items():
            self.patch.status[key] = value


def _stack(
    *,
    body: kopf.Body,
    spec: kopf.Spec,
    name: str,
    namespace: str | None,
    uid: str,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: stack.Logger,
    **_: Any,
) -> _Stack:
    """The kopf arguments a resource handler was called with, unpacked once."""
    assert name and namespace and uid  # a namespaced resource kopf delivered
    owner = Owner(name=name, namespace=namespace, uid=uid)
    return _Stack(body, spec, owner, meta.get("generation"), status, patch, _memory(memo), logger)


async def _annotated_loops(scaler: AnnotatedScaler, lora: AnnotatedLora) -> None:
    """The chart's Deployments: autoscaling and LoRA adapters, each its own loop."""
    await asyncio.gather(scaler.run(), lora.run())


async def startup(
    shared: Runtime,
    scaler: AnnotatedScaler,
    lora: AnnotatedLora,
    *,
    settings: kopf.OperatorSettings,
    **_: Any,
) -> None:
    s = shared.settings
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
    shared.start(partial(_annotated_loops, scaler, lora))


async def login(shared: Runtime, **_: Any) -> kopf.ConnectionInfo:
    # the very credentials shared.kube uses (kvstack.common.kube), so both act as one identity
    return await kopf_login(shared.settings.kubeconfig, shared.settings.context)


async def cleanup(shared: Runtime, **_: Any) -> None:
    await shared.close()


async def track(
    scaler: AnnotatedScaler, lora: AnnotatedLora, *, type: str | None, body: kopf.Body, **_: Any
) -> None:
    scaler.observe(type, body)  # async: on the loop's thread, as the evaluation loop is
    lora.observe(type, body)


async def apply_spec(shared: Runtime, **kwargs: Any) -> None:
    kv, now = _stack(**kwargs), time.time()
    assert shared.kube is not None  # startup opened it before any resource handler runs
    applied = await stack.apply(
        shared.kube,
        kv.owner,
        kv.spec,
        kv.generation,
        kv.memory,
        now=now,
        resync_seconds=shared.settings.resync_seconds,
        logger=kv.logger,
    )
    kv.write(applied.change, now)
    if applied.failed is not None:
        err = applied.failed
        raise kopf.TemporaryError(f"applying the stack's objects failed: {err}", delay=10) from err


async def forget(shared: Runtime, *, spec: kopf.Spec, namespace: str | None, **_: Any) -> None:
    stack.forget(shared.metrics, namespace or "", spec)


async def tick(shared: Runtime, **kwargs: Any) -> None:
    kv, now = _stack(**kwargs), time.time()
    change = await stack.tick(
        shared, kv.owner, kv.spec, kv.generation, kv.status, kv.memory, now=now, logger=kv.logger
    )
    if change is not None:
        kv.write(change, now)


def build_registry(runtime: Runtime) -> kopf.OperatorRegistry:
    """Every handler of the operator, registered on a new registry, bound to ``runtime``."""
    registry = kopf.OperatorRegistry()
    scaler = AnnotatedScaler(runtime)
    lora = AnnotatedLora(runtime)  # the chart's Deployments' LoRA adapters (kvstack.dev/lora)
    tick_s = runtime.settings.tick_seconds
    kopf.on.startup(registry=registry)(partial(startup, runtime, scaler, lora))
    kopf.on.login(registry=registry)(partial(login, runtime))
    kopf.on.cleanup(registry=registry)(partial(cleanup, runtime))
    # Every Deployment in the watched namespaces: the chart's engines ask for autoscaling by
    # annotation. A watch handler adds no finalizer to objects Helm owns (a timer would).
    kopf.on.event("apps", "v1", "deployments", id=TRACK_ID, registry=registry)(partial(track, scaler, lora))
    applying = partial(apply_spec, runtime)
    kopf.on.resume(*RESOURCE, registry=registry)(applying)
    kopf.on.create(*RESOURCE, registry=registry)(applying)
    kopf.on.update(*RESOURCE, field="spec", registry=registry)(applying)
    kopf.on.delete(*RESOURCE, registry=registry, optional=True)(partial(forget, runtime))
    # A failure the tick does not handle retries soon (kopf's default backoff is 60 s).
    kopf.timer(*RESOURCE, interval=tick_s, backoff=5 * tick_s, registry=registry)(partial(tick, runtime))
    return registry
