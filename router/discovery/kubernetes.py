"""Kubernetes discovery: list + watch engine Pods by label selector in one namespace.

The loop follows client-go's reflector: list (paginated) to get the pods and a resourceVersion,
then watch from it with bookmarks. A watch the server ends normally (``timeoutSeconds``) resumes
from the last resourceVersion seen; a 410 Gone (the version was compacted away) or an ``ERROR``
event re-lists at once; any other failure (API server down, bad credentials, broken stream)
re-lists after an exponential backoff with jitter. Until a list succeeds again the registry keeps
the last known engines: an API-server outage must not take the engines out of rotation.
Credentials are re-read on every re-list (service-account tokens rotate).

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
import contextlib
import logging
import random
from collections.abc import Mapping
from pathlib import Path

import httpx
from pydantic import BaseModel, ConfigDict, Field

from kvstack.router.discovery.kubeapi import (
    ApiServer,
    WatchExpired,
    default_namespace,
    list_pods,
    load_api_server,
    watch_pods,
)
from kvstack.router.discovery.pods import (
    PodInfo,
    PortNames,
    apply_event,
    endpoints_from_pods,
    pods_from_list,
)
from kvstack.router.engines import Endpoint, EngineRegistry

log = logging.getLogger(__name__)


class KubernetesConfig(BaseModel):
    """Kubernetes discovery settings. Build with ``kvstack.common.config.build``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str | None = Field(None, description="default: the router pod's own namespace")
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
        self.namespace = self.config.namespace or default_namespace()
        self.pods: Mapping[str, PodInfo] = {}
        self.lists = 0  # successful (re-)lists, for tests and logs
        self._names = self.config.port_names()
        self._published: list[Endpoint] | None = None
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name="kubernetes-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

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
        cfg = self.config
        api: ApiServer = await asyncio.to_thread(load_api_server, cfg.kubeconfig, cfg.context)
        read_timeout = cfg.watch_timeout + cfg.request_timeout
        async with api.client(read_timeout=read_timeout, timeout=cfg.request_timeout) as http:
            body = await list_pods(http, api, self.namespace, cfg.label_selector)
            pods, rv = pods_from_list(body)
            self.lists += 1
            self._apply(pods)
            self._synced.set()
            while rv is not None:
                rv = await self._watch(http, api, rv)
        log.info("pod watch in %s needs a re-list", self.namespace)

    async def _watch(self, http: httpx.AsyncClient, api: ApiServer, rv: str) -> str | None:
        """Watch from ``rv``; returns where to resume, or None when a re-list is needed."""
        began, events = asyncio.get_running_loop().time(), 0
        try:
            async for event in watch_pods(
                http,
                api,
                self.namespace,
                self.config.label_selector,
                rv,
                timeout_seconds=self.config.watch_timeout,
            ):
                events += 1
                step = apply_event(self.pods, rv, event)
                if step.resync:
                    log.info("pod watch in %s: %s", self.namespace, step.reason)
                    return None
                rv = step.resource_version or rv
                if step.pods is not self.pods:
                    self._apply(step.pods)
        except WatchExpired as err:
            log.info("pod watch in %s: %s", self.namespace, err)
            return None
        if not events and asyncio.get_running_loop().time() - began < 1.0:
            # a watch the server ends at once, empty, would otherwise spin: back off and re-list
            raise ConnectionError("the pod watch ended as soon as it began")
        return rv

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
