"""The operator's LoRA round for one model: observe the engines, place, load and unload, report.

Run after each evaluation of a stack (:func:`kvstack.operator.stack.with_adapters`), for every
model with a ``lora`` section, and for each annotated chart Deployment
(:mod:`kvstack.operator.lora_annotated`). The decisions are pure (:mod:`kvstack.operator.lora_placement`,
:mod:`kvstack.operator.lora_report`); this module does the I/O in between:

1. the model's engine pods (ready: Running, Ready, with an IP, not being deleted), and what each
   lists in ``/v1/models``; an engine that does not answer counts as not ready this round;
2. each adapter's demand: the router's ``kvstack_router_requests_total`` rate by ``model_name``
   over :data:`RATE_WINDOW_S`, plus the requests it holds for the adapter; Prometheus failing, the
   rates are unknown (placements hold);
3. the placement's unloads, then its loads, per engine, engines concurrently, through the shared
   client (:class:`kvstack.common.lora.LoraClient`);
4. the status entries, Events and ``kvstack_operator_lora_operations_total``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstack.common.kube import KubeError, resource_path
from kvstack.common.lora import LoraClient, LoraError, LoraSpec
from kvstack.operator.kube import Kube
from kvstack.operator.lora_placement import Declared, EngineState, Placement, place
from kvstack.operator.lora_report import OpResult, Told, entries, loaded_after, notices
from kvstack.operator.metrics import OperatorMetrics
from kvstack.operator.ownership import Owner, selector_labels
from kvstack.operator.prom import Prometheus, PrometheusError
from kvstack.operator.resources import HTTP_PORT
from kvstack.operator.spec import KVStackSpec, Model

log = logging.getLogger(__name__)
Obj = dict[str, Any]
RATE_WINDOW_S = 120  # the request rate placement sees: long enough to smooth bursts


@dataclass(frozen=True, slots=True)
class Round:
    """What one stack's LoRA round writes: ``status.adapters`` and Events."""

    adapters: list[Obj] = field(default_factory=list)
    told: list[Told] = field(default_factory=list)


def engine_url(ip: str) -> str:
    return f"http://[{ip}]:{HTTP_PORT}" if ":" in ip else f"http://{ip}:{HTTP_PORT}"


def _pod_ready(pod: Obj) -> bool:
    status = pod.get("status") or {}
    if pod.get("metadata", {}).get("deletionTimestamp") or status.get("phase") != "Running":
        return False
    if not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


async def engine_pods(kube: Kube, namespace: str, labels: Mapping[str, str]) -> dict[str, str | None]:
    """The engine pods matching ``labels``: name -> base URL when ready, else None."""
    selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    listed = await kube.client.list(resource_path("v1", "pods", namespace), label_selector=selector)
    return {
        pod["metadata"]["name"]: engine_url(pod["status"]["podIP"]) if _pod_ready(pod) else None
        for pod in listed.items
    }


async def observe(client: LoraClient, pods: Mapping[str, str | None]) -> list[EngineState]:
    """Each pod's state; a ready pod whose engine does not answer counts as not ready."""

    async def one(name: str, url: str | None) -> EngineState:
        if url is None:
            return EngineState(name, False)
        try:
            listed = await client.loaded(url)
        except LoraError as err:
            log.info("engine %s does not list its adapters, skipped this round: %s", name, err)
            return EngineState(name, False)
        return EngineState(name, True, frozenset(a.name for a in listed))

    return list(await asyncio.gather(*(one(n, u) for n, u in sorted(pods.items()))))


async def request_rates(prom: Prometheus, namespace: str, names: Sequence[str]) -> dict[str, float] | None:
    """Each adapter's demand; None when Prometheus cannot say.

    The requests per second the routers answered, plus the requests they hold for it right now
    (``kvstack_router_queued_requests``, one per second each): a request held for an adapter no
    engine has is not answered yet, so without it an idle adapter would never get a slot back.
    """
    ns = namespace.replace("\\", "\\\\").replace('"', '\\"')
    sel = f'{{namespace="{ns}"}}'
    answered = f"sum by (model_name) (rate(kvstack_router_requests_total{sel}[{RATE_WINDOW_S}s]))"
    held = f"sum by (model_name) (kvstack_router_queued_requests{sel})"
    try:
        rates, queued = await asyncio.gather(prom.query(answered), prom.query(held))
    except PrometheusError as err:
        log.info("adapter request rates unknown, placements hold: %s", err)
        return None
    demand: dict[str, float] = {}
    for labels, value in [*rates, *queued]:
        name = labels.get("model_name", "")
        if not math.isnan(value):
            demand[name] = demand.get(name, 0.0) + value
    return {n: demand.get(n, 0.0) for n in names}


async def execute(
    client: LoraClient, placement: Placement, urls: Mapping[str, str | None], paths: Mapping[str, str]
) -> list[OpResult]:
    """The placement's unloads, then its loads, engine by engine (engines concurrently)."""

    async def on(engine: str, unload: Sequence[str], load: Sequence[str]) -> list[OpResult]:
        url = urls.get(engine)
        assert url is not None  # placement only changes ready engines
        out: list[OpResult] = []
        for name in unload:
            try:
                await client.ensure_unloaded(url, name)
                out.append(OpResult(engine, name, "unload"))
            except LoraError as err:
                out.append(OpResult(engine, name, "unload", err))
        for name in load:
            try:
                await client.ensure_loaded(url, name, paths[name])
                out.append(OpResult(engine, name, "load"))
            except LoraError as err:
                out.append(OpResult(engine, name, "load", err))
        return out

    done = await asyncio.gather(*(on(c.engine, c.unload, c.load) for c in placement.changes))
    return [r for results in done for r in results]


async def run_round(
    client: LoraClient,
    prom: Prometheus | None,
    metrics: OperatorMetrics,
    namespace: str,
    served: str,
    lora: LoraSpec,
    pods: Mapping[str, str | None],
    previous: Mapping[str, Mapping[str, Any]],
    model: str,
) -> Round:
    """One model's round over its engine ``pods``; ``served``: its first served name (metric label)."""
    states = await observe(client, pods)
    names = [a.name for a in lora.adapters]
    rates = await request_rates(prom, namespace, names) if prom is not None else None
    declared = [Declared(a.name, a.pinned) for a in lora.adapters]
    placement = place(declared, states, lora.max_loras, rates)
    results = await execute(client, placement, pods, {a.name: a.lora_path for a in lora.adapters})
    for r in results:
        metrics.lora_operation(namespace, served, r.op, r.ok)
        if not r.ok:
            log.warning("%s of adapter %s on %s failed: %s", r.op, r.adapter, r.engine, r.error)
    before = {s.name: s.loaded for s in states if s.ready}
    loaded = loaded_after(before, results)
    return Round(entries(model, placement, loaded, results, previous), notices(model, results, previous))


async def run_model(
    kube: Kube,
    client: LoraClient,
    prom: Prometheus | None,
    metrics: OperatorMetrics,
    owner: Owner,
    model: Model,
    previous: Mapping[str, Mapping[str, Any]],
) -> Round:
    """One model's round of a ``KVStack``."""
    assert model.lora is not None
    pods = await engine_pods(kube, owner.namespace, selector_labels(owner, "engine", model.name))
    served = model.served_names[0]
    return await run_round(
        client, prom, metrics, owner.namespace, served, model.lora, pods, previous, model.name
    )


async def run_stack(
    kube: Kube,
    client: LoraClient,
    prom: Prometheus | None,
    metrics: OperatorMetrics,
    owner: Owner,
    spec: KVStackSpec,
    previous: Sequence[Mapping[str, Any]],
) -> Round | None:
    """Every LoRA model's round; None when no model has a ``lora`` section, nor had one."""
    models = [m for m in spec.models if m.lora is not None]
    if not models:
        return Round() if previous else None  # an empty list clears what a removed section left
    before = {str(e.get("name")): e for e in previous if isinstance(e, Mapping)}
    out = Round()
    for model in models:
        try:
            got = await run_model(kube, client, prom, metrics, owner, model, before)
        except KubeError as err:
            log.warning("cannot list the engine pods of %s: %s", model.name, err)
            # keep what the status said about this model's adapters until the next round
            out.adapters.extend(
                dict(e) for e in previous if isinstance(e, Mapping) and e.get("model") == model.name
            )
            continue
        out.adapters.extend(got.adapters)
        out.told.extend(got.told)
    return out
