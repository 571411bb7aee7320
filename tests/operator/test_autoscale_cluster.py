"""End to end: the operator scales engine pods on a real Prometheus scraping the simulators behind them.

Real API server + controller-manager + kwok pods, a ``kvstack engine sim`` per Running engine pod on
the pod's IP (PodSimulators), a Prometheus 3.15 that finds the pods through the API server
(Kubernetes pod discovery, a pod-reader ServiceAccount's token, relabelled as the chart's
PodMonitor does), and the operator under KopfRunner. Scale from zero runs a real ``kvstack router``
from the operator's own router ConfigMap, on the router pod's IP, discovering engine pods through
the API. Intervals are shortened by the spec.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai.types.chat import ChatCompletion

from kvstack.common.kube import resource_path
from kvstack.common.procs import ManagedProcess, free_port, running
from kvstack.common.waits import wait_until
from kvstack.observability.prometheus import (
    KubeAccess,
    PodJob,
    PrometheusAPI,
    prometheus_process,
    prometheus_url,
)
from kvstack.operator.runtime import Runtime
from kvstack_testing import Cluster, PodSimulators, SimTarget, operator_runner, operator_settings
from kvstack_testing.pod_sims import kvstack_executable

from .conftest import Api, evaluations

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "sim-llama"
INTERVAL = 2  # seconds between evaluations
DOWN_WINDOW = 20  # scale-down stabilization


# kwok marks pods Ready before their simulator listens; the harness labels them once it answers.
READY_LABEL = "sim.kvstack.io/ready"


def prometheus(workdir: Path, cluster: Cluster, namespace: str, access: KubeAccess) -> ManagedProcess:
    """Prometheus discovering the namespace's engine and router pods through the API server."""
    return prometheus_process(
        workdir,
        [],
        free_port(),
        rule_files=[],
        scrape_interval="1s",
        binary=str(cluster.tools.prometheus),
        pod_jobs=[
            PodJob("kvstack-engine", "engine", namespaces=(namespace,)),
            PodJob("kvstack-router", "router", namespaces=(namespace,)),
        ],
        kube=access,
    )


@pytest.fixture
def prom(
    cluster: Cluster, namespace: str, prom_access: KubeAccess, tmp_path: Path
) -> Iterator[ManagedProcess]:
    """:func:`prometheus`, started and ready; stopped after the test (if the test has not)."""
    with running([prometheus(tmp_path / "prometheus", cluster, namespace, prom_access)], 60) as (started,):
        yield started


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


@contextlib.contextmanager
def recording(api: Api, name: str) -> Iterator[list[tuple[float, int]]]:
    """(time, spec.replicas) of a Deployment every 0.25 s, while the block runs."""
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            dep = api.deployment(name)
            if dep is not None:
                samples.append((time.monotonic(), int(dep["spec"]["replicas"])))
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
    cluster: Cluster, namespace: str, api: Api, prom: ManagedProcess, tmp_path: Path
) -> None:
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
    settings = operator_settings(cluster, namespace, resync_seconds=30, prometheus_url=prometheus_url(prom))
    runtime = Runtime(settings)
    sims = PodSimulators(cluster.credentials(), "app.kubernetes.io/component=engine", namespace=namespace)
    with sims, operator_runner(runtime, namespace) as runner:
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
                wait_until(lambda: api.replicas("demo-llama") > 1, "a scale up", timeout=60)
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
                lambda: api.replicas("demo-llama") == 1,
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
        assert api.replicas("demo-llama") == 1
        assert runtime.metrics.registry.get_sample_value("kvstack_operator_prometheus_up") == 0.0
        reasons = {e["reason"] for e in api.events("demo")}
        assert {"ScaledUp", "ScaledDown", "PrometheusUnreachable"} <= reasons, reasons
    assert runner.exception is None, runner.output


def router_pod_ip(api: Api) -> str:
    """The IP kwok gave the router pod the operator's Deployment made."""
    path = resource_path("v1", "pods", api.namespace)
    pods = api.kube.list(path, label_selector="app.kubernetes.io/component=router").items
    running = [
        p["status"] for p in pods if p["status"].get("phase") == "Running" and p["status"].get("podIP")
    ]
    return str(running[0]["podIP"]) if running else ""


def operator_router(api: Api, cluster: Cluster, workdir: Path) -> ManagedProcess:
    """A ``kvstack router`` run with the operator's router ConfigMap, as the router pod would run it.

    Three keys differ from the pod: it binds the pod's IP (not 0.0.0.0), reaches the API server with
    the test cluster's kubeconfig (not a service-account token), and selects engine pods that carry
    the harness's readiness label too (kwok's Ready comes before the simulator listens).
    """
    ip = wait_until(lambda: router_pod_ip(api), "the router pod's IP", timeout=90)
    conf = api.kube.get(resource_path("v1", "configmaps", api.namespace, "demo-router"))
    assert conf is not None
    config: dict[str, Any] = yaml.safe_load(conf["data"]["router.yaml"])
    # The operator renders the hold for the scale-to-zero model: the router must not refuse it.
    assert config["hold_models"] == [MODEL]
    assert config["discovery"] == "kubernetes"
    config["host"] = ip
    kube = config["kubernetes"]
    kube |= {"kubeconfig": str(cluster.kubeconfig), "context": cluster.context}
    kube["label_selector"] += f",{READY_LABEL}=true"
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "router.yaml"
    config_file.write_text(yaml.safe_dump(config))
    argv = [kvstack_executable(), "router", "--config", str(config_file)]
    # /health, not /ready: with its only model at zero replicas the router has no engine yet.
    return ManagedProcess("router", argv, workdir, ready_url=f"http://{ip}:{config['port']}/health")


class Completion:
    """One chat completion through the openai SDK in a thread; ``result`` is the reply or the error."""

    def __init__(self, base_url: str) -> None:
        self.result: Any = None
        self._client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Wake up."}], max_tokens=8
            )
        except Exception as err:
            self.result = err

    def join(self, timeout: float) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"no answer within {timeout:.0f}s"
        return self.result


def queued_series(namespace: str) -> str:
    """The router's held count for the model, as the operator reads it, through the router job."""
    return (
        f'kvstack_router_queued_requests{{job="kvstack-router",namespace="{namespace}",model_name="{MODEL}"}}'
    )


@pytest.mark.usefixtures("kubeconfig_env")
def test_an_idle_model_scales_to_zero_and_a_held_request_wakes_it(
    cluster: Cluster, namespace: str, api: Api, prom: ManagedProcess, tmp_path: Path
) -> None:
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
        "router": {"enabled": True},
        "cache": {"mode": "none"},
        "autoscaling": {
            "intervalSeconds": INTERVAL,
            "scaleDown": {"stabilizationSeconds": 4},
            "scaleToZero": {"enabled": True, "idleSeconds": 30},
        },
    }
    sims = PodSimulators(
        cluster.credentials(),
        "app.kubernetes.io/component=engine",
        namespace=namespace,
        ready_label=READY_LABEL,
        log_dir=tmp_path / "sims",
    )
    router: ManagedProcess | None = None
    try:
        url = prometheus_url(prom)
        prom_api = PrometheusAPI(url)
        runtime = Runtime(operator_settings(cluster, namespace, prometheus_url=url))
        with sims, operator_runner(runtime, namespace) as runner:
            api.create("demo", spec)
            sims.wait_for(1, timeout=90)
            router = operator_router(api, cluster, tmp_path / "router")
            router.start().wait_ready(60)
            base_url = (router.ready_url or "").removesuffix("/health") + "/v1"
            # Prometheus found both through the API server, labelled as a PodMonitor labels them.
            prom_api.wait_for(f'up{{job="kvstack-engine",namespace="{namespace}"}} == 1', timeout=60)
            prom_api.wait_for(f'up{{job="kvstack-router",namespace="{namespace}"}} == 1', timeout=60)

            # No request at all: once the idle window's data says so, the model goes to zero.
            wait_until(lambda: api.replicas("demo-llama") == 0, "scale to zero", timeout=120)
            # The status is patched after the Deployment is scaled (and retried when the API server drops it).
            scaled = wait_until(
                lambda: api.get("demo")["status"]["models"][0].get("lastScale"), "lastScale in status"
            )
            assert scaled["reason"] == "idle"
            sims.wait_for(0, timeout=60)
            # Held at zero while the router holds nothing (and Prometheus sees it say so).
            prom_api.wait_for(f"{queued_series(namespace)} == 0", timeout=30)
            held = evaluations(runtime)
            wait_until(lambda: evaluations(runtime) >= held + 2, "two evaluations at zero")
            assert api.replicas("demo-llama") == 0

            # A user's request: the router holds it, Prometheus sees it held, the operator wakes the model.
            request = Completion(base_url)
            # (over a range: the wake must not end the hold before a poll here sees it)
            prom_api.wait_for(f"max_over_time({queued_series(namespace)}[10m]) >= 1", timeout=60)
            wait_until(lambda: api.replicas("demo-llama") >= 1, "a wake from zero", timeout=60)
            woke = wait_until(
                lambda: (m := api.get("demo")["status"]["models"][0])["lastScale"]["reason"] == "wake" and m,
                "lastScale wake",
            )
            assert woke["lastScale"]["direction"] == "up"
            assert woke["lastScale"]["toReplicas"] >= 1

            def wake_events() -> list[str]:
                events = api.events("demo")
                return [
                    e["message"] for e in events if e["reason"] == "ScaledUp" and "(wake)" in e["message"]
                ]

            wait_until(wake_events, "a ScaledUp event that says wake")

            # The pod's simulator comes up; the held request completes: slow, but a real answer.
            sims.wait_for(1, timeout=90)
            reply = request.join(timeout=120)
            assert isinstance(reply, ChatCompletion), reply
            assert reply.model == MODEL
            assert reply.choices[0].message.content
            assert reply.usage is not None and reply.usage.completion_tokens > 0
            prom_api.wait_for(f"{queued_series(namespace)} == 0", timeout=30)

            api.delete("demo")
            wait_until(lambda: not api.list(), "the stack gone")
        assert runner.exception is None, runner.output
    finally:
        if router is not None:
            router.stop()
