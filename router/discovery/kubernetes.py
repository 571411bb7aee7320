"""Kubernetes discovery: list + watch engine Pods by label selector in one namespace.

The loop follows client-go's reflector: list (paginated) to get the pods and a resourceVersion,
then watch from it with bookmarks. A watch the server ends normally (``timeoutSeconds``) resumes
from the last resourceVersion seen; a 410 Gone (the version was compacted away) or an ``ERROR``
event re-lists at once; any other failure (API server down, bad credentials, broken stream)
re-lists after an exponential backoff with jitter. Until a list succeeds again the registry keeps
the last known engines: an API-server outage must not take the engines out of rotation.
Credentials are loaded again on every re-list, and a rotated token is picked up on the next request
(:mod:`kvstack.common.kube`, which also does the list, the watch and their resumption).

Which pods count and which ports they use: see :mod:`kvstack.router.discovery.pods`. Models are
learnt by :class:`kvstack.router.monitor.EngineMonitor` from each ready pod's ``/v1/models``.

Usage::

    discovery = KubernetesDiscovery(registry, KubernetesConfig(label_selector="app=vllm"))
    discovery.start()
    async with asyncio.timeout(10):
        await discovery.wait_synced()   # optional: the first list has been applied
    ...
    await discovery.stop()

RBAC: ``get``, ``list``, ``watch`` on ``pods`` in the namespace.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from kvstack.common.kube import KubeClient, Listed, load_credentials, reflect, resource_path
from kvstack.common.tasks import BackgroundTask
from kvstack.router.discovery.pods import (
    PodInfo,
    PortNames,
    apply_event,
    endpoints_from_pods,
    pod_info,
)
from kvstack.router.engines import Endpoint, EngineRegistry

log = logging.getLogger(__name__)


class KubernetesConfig(BaseModel):
    """Kubernetes discovery settings. Build with ``kvstack.common.config.build``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str | None = Field(None, description="default: the pod's own, else the kubeconfig context's")
    label_selector: str = Field("", description="e.g. app.kubernetes.io/component=engine")
    port_name: str = Field("http", min_length=1, description="container port name of the OpenAI server")
    default_port: int = Field(8000, gt=0, lt=65536, description="used when no port has port_name")
    kv_events_port_name: str = "kv-events"
    kv_replay_port_name: str = "kv-replay"
    kubeconfig: Path | None = Field(None, description="default: in-cluster, else $KUBECONFIG/~/.kube/config")
    context: str | None = None
    watch_timeout: int = Field(300, gt=0, description="seconds before the server ends a watch")
    request_timeout: float = Field(10.0, gt=0)
    backoff_initial: float = Field(0.5, gt=0)
    backoff_max: float = Field(30.0, gt=0)

    def port_names(self) -> PortNames:
        return PortNames(
            self.port_name, self.default_port, self.kv_events_port_name, self.kv_replay_port_name
        )


def backoff_delay(failures: int, initial: float, maximum: float) -> float:
    """Exponential delay before retry number ``failures`` (1-based), capped at ``maximum``."""
    return min(maximum, initial * float(2 ** max(0, failures - 1)))


class KubernetesDiscovery:
    """Keeps the registry equal to the routable engine pods matching a label selector."""

    def __init__(self, registry: EngineRegistry, config: KubernetesConfig | None = None) -> None:
        self.registry = registry
        self.config = config or KubernetesConfig()
        # the configured one, else the credentials' (the pod's own, or the kubeconfig context's)
        self.namespace = self.config.namespace or "default"
        self.pods: Mapping[str, PodInfo] = {}
        self.lists = 0  # successful (re-)lists, for tests and logs
        self._names = self.config.port_names()
        self._published: list[Endpoint] | None = None
        self._synced = asyncio.Event()
        self._loop = BackgroundTask("kubernetes-discovery", self.run, logger=log)

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def wait_synced(self) -> None:
        """Wait until the first list has reached the registry (wrap in ``asyncio.timeout``)."""
        await self._synced.wait()

    async def run(self) -> None:
        """List and watch until cancelled."""
        failures = 0
        while True:
            try:
                await self._list_and_watch()
                failures = 0  # the watch asked for a re-list: do it now
            except asyncio.CancelledError:
                raise
            except Exception as err:  # any failure re-lists; which one only matters for the log
                failures += 1
                delay = backoff_delay(failures, self.config.backoff_initial, self.config.backoff_max)
                delay *= random.uniform(0.5, 1.0)  # jitter: router replicas must not re-list in step
                log.warning(
                    "pod discovery in %s failed (%s); re-listing in %.1fs", self.namespace, err, delay
                )
                await asyncio.sleep(delay)

    async def _list_and_watch(self) -> None:
        """One connection: list, then follow the watch until something fails (then the caller backs off)."""
        cfg = self.config
        creds = await asyncio.to_thread(load_credentials, cfg.kubeconfig, cfg.context)
        self.namespace = cfg.namespace or creds.namespace
        path = resource_path("v1", "pods", self.namespace)
        read_timeout = cfg.watch_timeout + cfg.request_timeout
        rv: str | None = None
        async with KubeClient(creds, timeout=cfg.request_timeout, read_timeout=read_timeout) as kube:
            async for item in reflect(
                kube, path, label_selector=cfg.label_selector, timeout_s=cfg.watch_timeout
            ):
                if isinstance(item, Listed):
                    if self.lists:
                        log.info("pod watch in %s re-listed", self.namespace)
                    pods, rv = {p.name: p for p in map(pod_info, item.items)}, item.resource_version
                    self.lists += 1
                    self._apply(pods)
                    self._synced.set()
                    continue
                step = apply_event(self.pods, rv, {"type": item.type, "object": item.object})
                rv = step.resource_version or rv
                if step.pods is not self.pods:
                    self._apply(step.pods)

    def _apply(self, pods: Mapping[str, PodInfo]) -> None:
        self.pods = pods
        endpoints = endpoints_from_pods(pods, self._names)
        if endpoints == self._published:
            return
        self._published = endpoints
        added, removed = self.registry.sync(endpoints)
        for st in added:
            log.info("engine pod added: %s (%s)", st.name, st.url)
        for st in removed:
            log.info("engine pod removed: %s (%s)", st.name, st.url)
