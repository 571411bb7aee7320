"""The router's Prometheus series (``kvstack_router_*``) in its own CollectorRegistry.

Labels stay bounded: ``model_name`` (vLLM's label, so ``on(model_name)`` joins work), ``engine``
(the engine's stable name), HTTP status codes, and small fixed reason sets. A model name comes from
the client, so it is a label only when it is configured or some engine serves it; any other is
counted as ``model_name="other"`` (:meth:`RouterMetrics.model_label`). Per-engine gauges are read
from the registry at scrape time, so the request path never updates them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from kvstack.router.engines import EngineRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
M = TypeVar("M", bound=MetricWrapperBase)
_MAX_CHILDREN = 10_000  # label sets remembered by `labelled`; engines come and go over months
OTHER_MODEL: Final = "other"  # the label of every model name no engine serves and none configured
# every reason the router refuses a request for; each series exists at 0 from the start
REJECTION_REASONS: Final = (
    "auth",
    "rate_limit",
    "key_concurrency",
    "queue_full",
    "queue_timeout",
    "body_too_large",
    "body_timeout",
    "body_budget",
    "hold_full",
    "hold_timeout",
    "connection_limit",
    "header_too_large",
    "header_timeout",
    "bad_request",  # not HTTP (the server's parser refused it)
    # flow control (router/flow/admission.py): a predicted TTFT miss, a tenant over its share, a
    # waiting request that made way for a higher class or a tenant under its share
    "slo",
    "over_share",
    "displaced",
)

# TTFT and e2e buckets reach from a prefix hit (~10 ms on an H200) to a long queue.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2)
# a cached prompt (~µs) to an uncached 32K-token document or an engine /tokenize round trip
_TOKENIZE_BUCKETS = (1e-5, 1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)


class _EngineCollector(Collector):
    """In-flight count and availability of each engine, read when Prometheus scrapes."""

    def __init__(self, engines: EngineRegistry, clock: Callable[[], float]) -> None:
        self._engines = engines
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        in_flight = GaugeMetricFamily(
            "kvstack_router_engine_in_flight_requests",
            "Requests the router has dispatched to the engine and not yet finished.",
            labels=["engine"],
        )
        healthy = GaugeMetricFamily(
            "kvstack_router_engine_available",
            "1 when the engine is healthy, not ejected and serving a model; else 0.",
            labels=["engine"],
        )
        failures = GaugeMetricFamily(
            "kvstack_router_engine_consecutive_failures",
            "Consecutive failed requests to the engine (passive ejection input).",
            labels=["engine"],
        )
        now = self._clock()
        for engine in self._engines.all():
            in_flight.add_metric([engine.name], engine.in_flight)
            healthy.add_metric([engine.name], 1.0 if engine.available(now) else 0.0)
            failures.add_metric([engine.name], engine.consecutive_failures)
        yield in_flight
        yield healthy
        yield failures


class _Registry(CollectorRegistry):
    """A registry that remembers its collectors that are not plain metrics (read at scrape time)."""

    def __init__(self) -> None:
        super().__init__(auto_describe=True)
        self.custom: list[Collector] = []

    def register(self, collector: Collector) -> None:
        super().register(collector)
        if not isinstance(collector, MetricWrapperBase):
            self.custom.append(collector)


class _Mirror:
    """With several workers: this worker's scrape-time collectors (the engines' gauges, the
    policy's index and cache stats) written to its own files in the shared metrics folder, so any
    worker's scrape reports them for the whole router: counters summed over every worker that
    ran, gauges the largest over the live workers (``livemax``: the engines' in-flight count is
    already the router's total, and each worker's index mirrors the same engines). Each file is
    rewritten whole and swapped in by rename, so a reader never sees half of one."""

    def __init__(self, folder: Path, registry: _Registry) -> None:
        pid = os.getpid()
        self._registry = registry
        # a pid's live gauges are removed with it (mark_process_dead); counters stay, as totals
        self._files = {
            "counter": folder / f"counter_mirror-{pid}.db",
            "gauge": folder / f"gauge_livemax_{pid}.db",
        }

    def write(self) -> None:
        values: dict[str, list[tuple[str, float]]] = {kind: [] for kind in self._files}
        for collector in self._registry.custom:
            for family in collector.collect():
                out = values.get(family.type)
                if out is None:
                    continue
                for sample in family.samples:
                    if sample.name.endswith("_created"):
                        continue
                    names = list(sample.labels)
                    label_values = [sample.labels[n] for n in names]
                    key = mmap_key(family.name, sample.name, names, label_values, family.documentation)
                    out.append((key, sample.value))
        now = time.time()
        for kind, path in self._files.items():
            staging = path.with_suffix(".tmp")  # not *.db: never read half-written
            staging.unlink(missing_ok=True)
            table = MmapedDict(str(staging))  # type: ignore[no-untyped-call]
            for key, value in values[kind]:
                table.write_value(key, value, now)  # type: ignore[no-untyped-call]
            table.close()  # type: ignore[no-untyped-call]
            staging.replace(path)


def _whole_router(registry: _Registry) -> tuple[CollectorRegistry, _Mirror] | None:
    """With several workers (router/workers.py sets ``PROMETHEUS_MULTIPROC_DIR``; prometheus_client
    then keeps every value in a file per process): what a scrape of any worker reports, read from
    every worker's files. Counters and histograms are summed over every worker that ever ran, the
    queue gauges over the live ones (``livesum``), the scrape-time collectors as :class:`_Mirror`
    writes them. None with one process."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder or not Path(folder).is_dir():
        return None
    scrape = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(scrape, folder)  # type: ignore[no-untyped-call]
    return scrape, _Mirror(Path(folder), registry)


class RouterMetrics:
    """Every router series; create one per app (tests run several apps in one process)."""

    def __init__(
        self, engines: EngineRegistry, clock: Callable[[], float], configured_models: Iterable[str] = ()
    ) -> None:
        self.registry = _Registry()
        self._workers = _whole_router(self.registry)
        self._children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}
        self._engines = engines
        self._configured = frozenset(configured_models) - {"*"}
        self._known: frozenset[str] = self._configured
        engines.listeners.append(self._engines_changed)
        self._engines_changed()
        r = self.registry
        self.requests = Counter(
            "kvstack_router_requests",
            "Requests answered, by model, engine and HTTP status (499: the client went away).",
            ["model_name", "engine", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "kvstack_router_time_to_first_token_seconds",
            "Arrival at the router to the first generated token forwarded (streams only).",
            ["model_name"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "kvstack_router_request_duration_seconds",
            "Arrival at the router to the last byte sent to the client.",
            ["model_name"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decision = Histogram(
            "kvstack_router_routing_decision_seconds",
            "Time the policy spent choosing an engine (tokenizing excluded: see tokenize_seconds).",
            ["policy"],
            buckets=_DECISION_BUCKETS,
            registry=r,
        )
        self.dispatch = Histogram(
            "kvstack_router_dispatch_seconds",
            "Arrival at the router to the request sent to an engine (body, parsing, admission, "
            "tokens, decision): the router's own share of the time to first token.",
            ["policy"],
            buckets=_TOKENIZE_BUCKETS,
            registry=r,
        )
        self.tokenize = Histogram(
            "kvstack_router_tokenize_seconds",
            "Time spent getting a prompt's tokens for the policy, by where they came from.",
            ["policy", "source"],
            buckets=_TOKENIZE_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "kvstack_router_routing_decisions",
            "Routing decisions by policy and reason.",
            ["policy", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "kvstack_router_retries",
            "Requests sent again to another engine, by what went wrong first.",
            ["model_name", "reason"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "kvstack_router_upstream_errors",
            "Failed attempts to get a response from an engine, by kind.",
            ["engine", "kind"],
            registry=r,
        )
        self.ejections = Counter(
            "kvstack_router_engine_ejections",
            "Times an engine was taken out of rotation after consecutive failures.",
            ["engine"],
            registry=r,
        )
        self.disconnects = Counter(
            "kvstack_router_client_disconnects",
            "Requests whose client went away before the response ended.",
            ["model_name"],
            registry=r,
        )
        self.native_streams = Counter(
            "kvstack_router_native_relay_streams",
            "Streams whose events after the first token went engine to client on the compiled "
            "relay's thread, by how the forward ended (end, read, timeout, client_gone, ...).",
            ["outcome"],
            registry=r,
        )
        self.rejections = Counter(
            "kvstack_router_rejections",
            "Requests refused by the router itself, by reason.",
            ["reason"],
            registry=r,
        )
        self.queued = Gauge(
            "kvstack_router_queued_requests",
            "Requests the router holds for the model: in its admission queue, or waiting for an engine "
            "while it has none (scale from zero).",
            ["model_name"],
            registry=r,
            multiprocess_mode="livesum",  # several workers: the sum over the live ones
        )
        # --- requests by route (the proxied API path: a fixed set, so a bounded label)
        self.route_requests = Counter(
            "kvstack_router_route_requests",
            "Requests answered, by route (the API path, e.g. /v1/responses) and HTTP status.",
            ["route", "status"],
            registry=r,
        )
        # ---
        # ---- flow control (router/flow/): tenant labels are configured names or "other"
        self.flow_queue_length = Gauge(
            "kvstack_router_flow_queue_length",
            "Requests waiting in the router's flow queue, by model, priority class and tenant.",
            ["model_name", "class", "tenant"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.flow_queue_wait = Histogram(
            "kvstack_router_flow_queue_wait_seconds",
            "Time a dispatched request waited in the flow queue (0 when an engine had room), by model "
            "(known models or other: the operator's queueWaitP90 reads it by model) and class.",
            ["model_name", "class"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.flow_shed = Counter(
            "kvstack_router_flow_shed",
            "Requests flow control refused (429), by reason and priority class.",
            ["reason", "class"],
            registry=r,
        )
        self.flow_goodput = Counter(
            "kvstack_router_flow_goodput",
            "Streamed requests whose TTFT met their class's objective (classes with one).",
            ["model_name", "class"],
            registry=r,
        )
        self.flow_objective_misses = Counter(
            "kvstack_router_flow_objective_misses",
            "Streamed requests whose TTFT missed their class's objective.",
            ["model_name", "class"],
            registry=r,
        )
        self.flow_hit_waits = Counter(
            "kvstack_router_flow_hit_waits",
            "Requests sent to the saturated engine holding their prefix, its backlog (and wait for a "
            "batch slot) expected to end sooner than a colder prefill on an engine with room "
            "(router/flow/placement.py).",
            ["model_name"],
            registry=r,
        )
        self.flow_ttft_ratio = Histogram(
            "kvstack_router_flow_ttft_prediction_ratio",
            "Actual over predicted TTFT of streamed requests (1: exact; above: later than predicted).",
            ["class"],
            buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 1.1, 1.5, 2.0, 4.0, 10.0),
            registry=r,
        )
        r.register(_EngineCollector(engines, clock))
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)  # present at 0 from the start, so rate() works at once

    def _engines_changed(self) -> None:
        # models once served stay labels (a model scaled to zero keeps its series): bounded by
        # what operators deploy, never by what clients send
        self._known = self._known | {m for e in self._engines.all() for m in e.models}

    def model_label(self, model: str) -> str:
        """``model`` when it is configured or an engine has served it (or "" for none), else
        ``"other"``."""
        return model if not model or model in self._known else OTHER_MODEL

    def reject(self, reason: str) -> None:
        """Count a refusal (one of :data:`REJECTION_REASONS`)."""
        self.rejections.labels(reason).inc()

    def labelled(self, metric: M, *values: str) -> M:
        """``metric.labels(*values)``, remembered: the request path skips the label checks and lock."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            if len(self._children) >= _MAX_CHILDREN:
                self._children.clear()
            child = self._children[key] = metric.labels(*values)
        return child  # type: ignore[return-value]

    def mirror(self) -> None:
        """With several workers: publish this worker's scrape-time collectors (router/workers.py
        calls it every second; a scrape this worker answers, first)."""
        if self._workers is not None:
            self._workers[1].write()

    def render(self) -> bytes:
        if self._workers is None:
            return generate_latest(self.registry)
        scrape, mirror = self._workers
        mirror.write()
        return generate_latest(scrape)
