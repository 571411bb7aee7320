"""End to end: the operator scales engine pods on a real Prometheus scraping the simulators behind them.

Real API server + controller-manager + kwok pods, a ``kvstack engine sim`` per Running engine pod on
the pod's IP (PodSimulators), Prometheus scraping those pods with the labels a PodMonitor gives
them, and the operator under KopfRunner. Intervals are shortened by the spec.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kopf.testing import KopfRunner
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from kvstack.common.procs import ManagedProcess, free_port
from kvstack.observability.prometheus import prometheus_process
from kvstack.operator.handlers import Runtime, build_registry
from kvstack.operator.settings import OperatorSettings
from kvstack.testing import Cluster, PodSimulators, SimTarget

from .conftest import Api, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "sim-llama"
INTERVAL = 2  # seconds between evaluations
DOWN_WINDOW = 20  # scale-down stabilization


def prometheus(workdir: Path, targets_file: Path) -> ManagedProcess:
    """Prometheus scraping the engine pods listed in ``targets_file`` (Debian's build has no
    kubernetes_sd; :class:`PodDiscovery` writes the same targets a PodMonitor would find)."""
    return prometheus_process(
        workdir,
        [],
        free_port(),
        rule_files=[],
        scrape_interval="1s",
        file_sd={"kvstack-engine": targets_file},
    )


class PodDiscovery:
    """Writes the simulators behind Running engine pods as file_sd targets, labelled namespace/pod."""

    def __init__(self, sims: PodSimulators, path: Path, extra: list[dict[str, Any]] | None = None) -> None:
        self._sims, self.path, self._extra = sims, path, extra or []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._write([])

    def _write(self, groups: list[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.path)  # atomic: Prometheus never reads half a file

    def _loop(self) -> None:
        last: list[dict[str, Any]] = []
        while not self._stop.wait(0.5):
            groups = [
                {"targets": [f"{t.host}:{t.port}"], "labels": {"namespace": t.namespace, "pod": t.name}}
                for t in sorted(self._sims.targets.values(), key=lambda t: t.name)
            ] + self._extra
            if groups != last:
                self._write(groups)
                last = groups

    def __enter__(self) -> PodDiscovery:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Load:
    """``concurrent`` completions kept in flight, each sent to the simulator with the fewest of ours."""

    def __init__(self, sims: PodSimulators, concurrent: int) -> None:
        self._sims = sims
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(concurrent)]
        self.stopped_at = 0.0

    def _pick(self) -> SimTarget | None:
        targets = list(self._sims.targets.values())
        if not targets:
            return None
        with self._lock:
            target = min(targets, key=lambda t: self._in_flight.get(t.url, 0))
            self._in_flight[target.url] = self._in_flight.get(target.url, 0) + 1
        return target

    def _worker(self) -> None:
        body = {"model": MODEL, "prompt": "hello " * 20, "max_tokens": 200, "ignore_eos": True}
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                target = self._pick()
                if target is None:
                    self._stop.wait(0.2)
                    continue
                try:
                    client.post(f"{target.url}/v1/completions", json=body)
                except httpx.HTTPError:
                    self._stop.wait(0.2)  # a simulator still starting, or one being stopped
                finally:
                    with self._lock:
                        self._in_flight[target.url] -= 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped_at = time.monotonic()  # no new requests from here; queued ones still finish
        self._stop.set()
        for t in self._threads:
            t.join(timeout=70)


def evaluations(runtime: Runtime) -> float:
    """How many evaluations the operator has finished (all models, all outcomes)."""
    return sum(
        s.value for m in runtime.metrics.decisions.collect() for s in m.samples if s.name.endswith("_total")
    )


@contextlib.contextmanager
def recording(api: Api, name: str) -> Iterator[list[tuple[float, int]]]:
    """(time, spec.replicas) of a Deployment every 0.25 s, while the block runs."""
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            dep = api.deployment(name)
            if dep is not None:
                samples.append((time.monotonic(), int(dep.spec.replicas)))
            stop.wait(0.25)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(timeout=10)


def changes(samples: list[tuple[float, int]]) -> list[tuple[float, int, int]]:
    return [(t, a, b) for (_, a), (t, b) in itertools.pairwise(samples) if a != b]


@pytest.mark.usefixtures("kubeconfig_env")
def test_load_scales_engines_up_then_down_and_a_blind_operator_holds(
    cluster: Cluster, namespace: str, api: Api, tmp_path: Path
) -> None:
    targets_file = tmp_path / "targets.json"
    prom = prometheus(tmp_path / "prometheus", targets_file)
    spec: dict[str, Any] = {
        "models": [
            {
                "name": "llama",
                "model": MODEL,
                "gpus": 1,
                "minReplicas": 1,
                "maxReplicas": 4,
                "podAnnotations": {"sim.kvstack.io/model": MODEL, "sim.kvstack.io/args": "--max-num-seqs 1"},
            }
        ],
        "router": {"enabled": False},
        "cache": {"mode": "none"},
        "autoscaling": {
            "metric": "waitingPerReplica",
            "target": 2,
            "intervalSeconds": INTERVAL,
            "staleAfterSeconds": 30,
            "scaleDown": {"stabilizationSeconds": DOWN_WINDOW},
        },
    }
    settings = OperatorSettings(
        namespace=namespace,
        kubeconfig=cluster.kubeconfig,
        context=cluster.context,
        metrics_port=0,
        liveness_port=0,
        tick_seconds=0.5,
        resync_seconds=30,
        prometheus_url=prom.ready_url.removesuffix("/-/ready") if prom.ready_url else "",
    )
    runtime = Runtime(settings)
    sims = PodSimulators(cluster.api_client(), "app.kubernetes.io/component=engine", namespace=namespace)
    args = ["run", "--standalone", "--namespace", namespace]
    prom.start()
    try:
        prom.wait_ready(60)
        with (
            sims,
            PodDiscovery(sims, targets_file),
            KopfRunner(args, registry=build_registry(runtime), timeout=30) as runner,
        ):
            api.create("demo", spec)
            sims.wait_for(1, timeout=90)
            wait_until(
                lambda: (api.condition("demo", "PrometheusReachable") or {}).get("status") == "True",
                "the first successful query",
            )
            # Prometheus must see the pod before a load step can show.
            wait_until(lambda: evaluations(runtime) >= 2, "two evaluations")
            with recording(api, "demo-llama") as samples:
                # 1. Load step: 8 requests in flight on a 1-seq engine = 7 waiting vs target 2.
                with Load(sims, concurrent=8) as load:
                    before = evaluations(runtime)
                    wait_until(
                        lambda: api.deployment("demo-llama").spec.replicas > 1, "a scale up", timeout=60
                    )
                    # Within two evaluation periods of Prometheus seeing the load (one more for the scrape).
                    assert evaluations(runtime) - before <= 3
                    # The status patch follows the /scale write of the same evaluation.
                    status = wait_until(
                        lambda: (
                            api.get("demo")["status"]["models"][0].get("lastScale") is not None
                            and api.get("demo")["status"]["models"][0]
                        ),
                        "lastScale in status",
                    )
                    assert status["lastScale"]["direction"] == "up"
                    assert status["lastScale"]["reason"] in ("queue", "max_replicas")
                    assert status["lastDecision"]["time"] >= status["lastScale"]["time"]
                    # 2. Steady load: no reversal over two windows (one step down allowed: the
                    # scale up overshoots by design, as the HPA's does).
                    steady_from = time.monotonic()
                    time.sleep(2 * DOWN_WINDOW)
                load_stopped = load.stopped_at
                # 3. Load gone: replicas fall to minReplicas, the first step only after the window.
                wait_until(
                    lambda: api.deployment("demo-llama").spec.replicas == 1,
                    "back to minReplicas",
                    timeout=120,
                )
            first_up = next(t for t, a, b in changes(samples) if b > a)
            steady = [c for c in changes(samples) if max(steady_from, first_up) < c[0] < load_stopped]
            assert all(b < a for _, a, b in steady), f"flapped under steady load: {steady}"
            assert len(steady) <= 1, steady
            first_down = next(t for t, a, b in changes(samples) if t >= load_stopped and b < a)
            assert first_down - load_stopped >= DOWN_WINDOW - INTERVAL
            assert all(a - b <= 1 for _, a, b in changes(samples) if b < a)  # one pod per period

            # 4. Prometheus gone: replicas held, the condition says why.
            prom.stop()
            cond = wait_until(
                lambda: (c := api.condition("demo", "PrometheusReachable")) and c["status"] == "False" and c,
                "PrometheusReachable=False",
            )
            assert cond["reason"] == "QueryFailed"
            scaling = api.condition("demo", "ScalingActive")
            assert scaling is not None and scaling["reason"] == "MetricsUnavailable"
            held = evaluations(runtime)
            wait_until(lambda: evaluations(runtime) >= held + 3, "three blind evaluations")
            assert api.deployment("demo-llama").spec.replicas == 1
            assert runtime.metrics.registry.get_sample_value("kvstack_operator_prometheus_up") == 0.0
            events = api.core.list_namespaced_event(
                namespace, field_selector="involvedObject.name=demo"
            ).items
            reasons = {e.reason for e in events}
            assert {"ScaledUp", "ScaledDown", "PrometheusUnreachable"} <= reasons, reasons
        assert runner.exception is None, runner.output
    finally:
        prom.stop()


@pytest.mark.usefixtures("kubeconfig_env")
def test_an_idle_model_scales_to_zero_and_wakes_on_router_pending(
    cluster: Cluster, namespace: str, api: Api, tmp_path: Path
) -> None:
    # The router's admission-queue gauge, as the router exports it (a stand-in until the router
    # holds requests for a model with no engine; the operator only reads the series).
    registry = CollectorRegistry()
    pending = Gauge("kvstack_router_queued_requests", "queued", ["model_name"], registry=registry)
    pending.labels(MODEL).set(0)
    router_port = free_port()
    server, thread = start_http_server(router_port, addr="127.0.0.1", registry=registry)
    router = {"targets": [f"127.0.0.1:{router_port}"], "labels": {"namespace": namespace, "pod": "router-0"}}
    targets_file = tmp_path / "targets.json"
    prom = prometheus(tmp_path / "prometheus", targets_file)
    spec: dict[str, Any] = {
        "models": [
            {
                "name": "llama",
                "model": MODEL,
                "minReplicas": 0,
                "maxReplicas": 2,
                "podAnnotations": {"sim.kvstack.io/model": MODEL},
            }
        ],
        "router": {"enabled": False},
        "cache": {"mode": "none"},
        "autoscaling": {
            "intervalSeconds": INTERVAL,
            "scaleDown": {"stabilizationSeconds": 4},
            "scaleToZero": {"enabled": True, "idleSeconds": 30},
        },
    }
    sims = PodSimulators(cluster.api_client(), "app.kubernetes.io/component=engine", namespace=namespace)
    prom.start()
    try:
        prom.wait_ready(60)
        url = (prom.ready_url or "").removesuffix("/-/ready")
        runtime = Runtime(
            OperatorSettings(
                namespace=namespace,
                kubeconfig=cluster.kubeconfig,
                context=cluster.context,
                metrics_port=0,
                liveness_port=0,
                tick_seconds=0.5,
                prometheus_url=url,
            )
        )
        args = ["run", "--standalone", "--namespace", namespace]
        with (
            sims,
            PodDiscovery(sims, targets_file, extra=[router]),
            KopfRunner(args, registry=build_registry(runtime), timeout=30) as runner,
        ):
            api.create("demo", spec)
            sims.wait_for(1, timeout=90)
            # No request at all: once the idle window's data says so, the model goes to zero.
            wait_until(lambda: api.deployment("demo-llama").spec.replicas == 0, "scale to zero", timeout=120)
            entry = api.get("demo")["status"]["models"][0]
            assert entry["lastScale"]["reason"] == "idle"
            sims.wait_for(0, timeout=60)
            # Held while nothing is pending.
            held = evaluations(runtime)
            wait_until(lambda: evaluations(runtime) >= held + 2, "two evaluations at zero")
            assert api.deployment("demo-llama").spec.replicas == 0
            # The router holds requests for the model: wake it.
            pending.labels(MODEL).set(3)
            wait_until(
                lambda: api.deployment("demo-llama").spec.replicas == 1, "a wake from zero", timeout=60
            )
            woke = wait_until(
                lambda: (m := api.get("demo")["status"]["models"][0])["lastScale"]["reason"] == "wake" and m,
                "lastScale wake",
            )
            assert woke["lastScale"]["toReplicas"] == 1
            api.delete("demo")
            wait_until(lambda: not api.list(), "the stack gone")
        assert runner.exception is None, runner.output
    finally:
        prom.stop()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
