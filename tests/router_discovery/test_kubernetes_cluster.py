"""Kubernetes discovery (and the monitor) against a real control plane: kube-apiserver + etcd,
with kwok playing the kubelet and ``kvstack engine sim`` processes answering on the pod IPs."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from tests.router_discovery.test_monitor_live import until

from kvstack.router.discovery import KubernetesConfig, KubernetesDiscovery
from kvstack.router.engines import EngineRegistry
from kvstack.router.monitor import EngineMonitor, MonitorConfig

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LABELS = {"app.kubernetes.io/component": "engine", "test": "discovery"}
SELECTOR = ",".join(f"{k}={v}" for k, v in LABELS.items())


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    try:
        from kvstack.testing.cluster import Cluster, ClusterConfig
        from kvstack.testing.tools import Toolchain
    except ImportError as err:
        pytest.skip(f"the local control plane harness is not available: {err}")
    try:
        tools = Toolchain.load()
    except OSError as err:
        pytest.skip(f"cluster toolchain versions not found: {err}")
    if missing := tools.missing():
        pytest.skip(
            f"cluster binaries absent (build them with `make cluster`): {', '.join(map(str, missing))}"
        )
    c = Cluster(ClusterConfig(gpu_nodes=1, gpus_per_node=8), tools)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def namespace(cluster: Any) -> Iterator[str]:
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client())
    name = f"disc-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    try:
        yield name
    finally:
        core.delete_namespace(name)


def engine_pod(name: str, *, labels: dict[str, str] = LABELS, schedulable: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "vllm",
                "image": "kvstack/engine:test",
                "args": ["--model", "sim-disc"],
                "ports": [
                    {"name": "http", "containerPort": 8000},
                    {"name": "kv-events", "containerPort": 5557},
                ],
            }
        ],
        "terminationGracePeriodSeconds": 0,
    }
    if not schedulable:
        spec["nodeSelector"] = {"kvstack.io/no-such-node": "true"}  # stays Pending: its status is ours
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels}, "spec": spec}


def ready_status(ip: str, ready: bool) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [
                {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now}
            ],
        }
    }


@pytest.fixture
async def discovery(cluster: Any, namespace: str) -> AsyncIterator[KubernetesDiscovery]:
    config = KubernetesConfig(
        namespace=namespace, label_selector=SELECTOR, kubeconfig=cluster.kubeconfig, context=cluster.context
    )
    d = KubernetesDiscovery(EngineRegistry(), config)
    d.start()
    try:
        async with asyncio.timeout(30):
            await d.wait_synced()
        yield d
    finally:
        await d.stop()


def pod_names(d: KubernetesDiscovery) -> set[str]:
    return {st.name for st in d.registry.all()}


async def test_registry_follows_pods(cluster: Any, namespace: str, discovery: KubernetesDiscovery) -> None:
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client())

    def call(fn: Any, *args: Any) -> Any:
        return asyncio.to_thread(fn, *args)

    await call(core.create_namespaced_pod, namespace, engine_pod("engine-a"))
    await call(core.create_namespaced_pod, namespace, engine_pod("other", labels={"app": "x"}))
    await until(lambda: pod_names(discovery) == {"engine-a"}, "kwok runs engine-a", 60)
    (st,) = discovery.registry.all()
    pod = await call(core.read_namespaced_pod, "engine-a", namespace)
    assert st.url == f"http://{pod.status.pod_ip}:8000"
    assert st.endpoint.kv_events_endpoint == f"tcp://{pod.status.pod_ip}:5557"

    # a pod whose status the test sets by hand (no node will take it)
    await call(core.create_namespaced_pod, namespace, engine_pod("engine-b", schedulable=False))
    await asyncio.sleep(0.5)
    assert pod_names(discovery) == {"engine-a"}  # Pending is not routable
    await call(core.patch_namespaced_pod_status, "engine-b", namespace, ready_status("127.99.0.2", True))
    await until(lambda: pod_names(discovery) == {"engine-a", "engine-b"}, "engine-b ready", 30)
    assert discovery.registry.get("http://127.99.0.2:8000") is not None
    await call(core.patch_namespaced_pod_status, "engine-b", namespace, ready_status("127.99.0.2", False))
    await until(lambda: pod_names(discovery) == {"engine-a"}, "engine-b not ready", 30)

    await call(core.delete_namespaced_pod, "engine-a", namespace)
    await until(lambda: pod_names(discovery) == set(), "engine-a deleted", 60)


async def test_monitor_learns_models_of_discovered_pods(
    cluster: Any, namespace: str, discovery: KubernetesDiscovery
) -> None:
    from kubernetes import client

    from kvstack.testing.pod_sims import PodSimulators

    core = client.CoreV1Api(cluster.api_client())
    with PodSimulators(cluster.api_client(), SELECTOR, namespace=namespace):
        for name in ("engine-0", "engine-1"):
            await asyncio.to_thread(core.create_namespaced_pod, namespace, engine_pod(name))
        async with httpx.AsyncClient(trust_env=False) as http:
            monitor = EngineMonitor(
                discovery.registry, http, MonitorConfig(probe_interval=0.2, scrape_interval=0.2)
            )
            monitor.start()
            try:
                await until(
                    lambda: len(discovery.registry.candidates("sim-disc", time.monotonic())) == 2,
                    "both pods serve sim-disc",
                    90,
                )
                assert all(st.block_size == 16 for st in discovery.registry.all())
            finally:
                await monitor.stop()
