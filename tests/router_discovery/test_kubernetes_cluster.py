"""Kubernetes discovery (and the monitor) against a real control plane: kube-apiserver + etcd,
with kwok playing the kubelet and ``kvstack engine sim`` processes answering on the pod IPs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from tests.router_discovery.test_monitor_live import until

from kvstack.common.kube import KubeClient, resource_path
from kvstack.router.discovery import KubernetesConfig, KubernetesDiscovery
from kvstack.router.engines import EngineRegistry
from kvstack.router.fetch import EngineFetch
from kvstack.router.monitor import EngineMonitor, MonitorConfig

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LABELS = {"app.kubernetes.io/component": "engine", "test": "discovery"}
SELECTOR = ",".join(f"{k}={v}" for k, v in LABELS.items())


@pytest.fixture
async def kube(cluster: Any) -> AsyncIterator[Kube]:
    async with KubeClient(cluster.credentials()) as client:
        yield Kube(client)


class Kube:
    """The few writes the tests make, through the shared client."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client

    async def create_pod(self, ns: str, pod: dict[str, Any]) -> None:
        await self.client.create(resource_path("v1", "pods", ns), pod)

    async def set_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        await self.client.merge_patch(resource_path("v1", "pods", ns, name, "status"), status)

    async def pod_ip(self, ns: str, name: str) -> str:
        pod = await self.client.get(resource_path("v1", "pods", ns, name))
        assert pod is not None
        return str(pod["status"]["podIP"])

    async def delete_pod(self, ns: str, name: str) -> None:
        await self.client.delete(resource_path("v1", "pods", ns, name))


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


async def test_registry_follows_pod_status(
    kube: Kube, namespace: str, discovery: KubernetesDiscovery
) -> None:
    # pods no node will take: the test writes their status as a kubelet would
    await kube.create_pod(namespace, engine_pod("engine-b", schedulable=False))
    await kube.create_pod(namespace, engine_pod("other", labels={"app": "x"}, schedulable=False))
    await asyncio.sleep(0.5)
    assert pod_names(discovery) == set()  # Pending is not routable
    await kube.set_status(namespace, "other", ready_status("127.99.0.9", True))
    await kube.set_status(namespace, "engine-b", ready_status("127.99.0.2", True))
    await until(lambda: pod_names(discovery) == {"engine-b"}, "engine-b ready", 30)
    assert discovery.registry.get("http://127.99.0.2:8000") is not None
    await kube.set_status(namespace, "engine-b", ready_status("127.99.0.3", True))
    await until(lambda: discovery.registry.get("http://127.99.0.3:8000") is not None, "IP change", 30)
    assert len(discovery.registry) == 1
    await kube.set_status(namespace, "engine-b", ready_status("127.99.0.3", False))
    await until(lambda: pod_names(discovery) == set(), "engine-b not ready", 30)
    await kube.set_status(namespace, "engine-b", ready_status("127.99.0.3", True))
    await until(lambda: pod_names(discovery) == {"engine-b"}, "engine-b ready again", 30)
    await kube.delete_pod(namespace, "engine-b")  # no kubelet: deletion is immediate
    await until(lambda: pod_names(discovery) == set(), "engine-b deleted", 30)


async def test_registry_follows_kwok_pods(
    cluster: Any, kube: Kube, namespace: str, discovery: KubernetesDiscovery
) -> None:
    await kube.create_pod(namespace, engine_pod("engine-a"))
    await kube.create_pod(namespace, engine_pod("other", labels={"app": "x"}))
    await until(lambda: pod_names(discovery) == {"engine-a"}, "kwok runs engine-a", 60)
    (st,) = discovery.registry.all()
    ip = await kube.pod_ip(namespace, "engine-a")
    assert st.url == f"http://{ip}:8000"
    assert st.endpoint.kv_events_endpoint == f"tcp://{ip}:5557"

    await kube.delete_pod(namespace, "engine-a")
    await until(lambda: pod_names(discovery) == set(), "engine-a deleted", 60)


async def test_monitor_learns_models_of_discovered_pods(
    cluster: Any, kube: Kube, namespace: str, discovery: KubernetesDiscovery
) -> None:
    from kvstack_testing.pod_sims import PodSimulators

    with PodSimulators(cluster.credentials(), SELECTOR, namespace=namespace):
        for name in ("engine-0", "engine-1"):
            await kube.create_pod(namespace, engine_pod(name))
        http = EngineFetch()
        config = MonitorConfig(probe_interval=0.2, scrape_interval=0.2)
        monitor = EngineMonitor(discovery.registry, http, config)
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
            await http.aclose()
