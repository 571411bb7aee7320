"""The list/watch loop of Kubernetes discovery over real HTTP, against a scripted API endpoint.

The scripted endpoint speaks the pod list/watch wire protocol (paged list, JSON-lines watch) and
lets a test produce what a real API server does only at its own moment: a 410 Gone on watch, an
``ERROR`` event in the stream, a watch the server ends, an outage. Credentials come from a real
kubeconfig file through :mod:`kvstack.common.kube`. The same loop against a real
kube-apiserver is in ``test_kubernetes_cluster.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from tests.conftest import free_port
from tests.router_discovery.test_monitor_live import until
from tests.router_discovery.test_pods import pod

from kvstack.router.discovery import KubernetesConfig, KubernetesDiscovery
from kvstack.router.engines import EngineRegistry

_END = {"type": "__end__"}


class ScriptedApi:
    def __init__(self, port: int) -> None:
        self.port = port
        self.rv = 100
        self.pods: dict[str, dict[str, Any]] = {}
        self.watchers: list[asyncio.Queue[dict[str, Any]]] = []
        self.lists: list[dict[str, str]] = []
        self.watches: list[dict[str, str]] = []
        self.auth: set[str] = set()
        self.gone_next_watch = False
        self.refusing = False
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    # what a test does to the "cluster"

    def emit(self, kind: str, obj: dict[str, Any]) -> None:
        for q in self.watchers:
            q.put_nowait({"type": kind, "object": obj})

    def put(self, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        kind = "MODIFIED" if obj["metadata"]["name"] in self.pods else "ADDED"
        self.pods[obj["metadata"]["name"]] = obj
        self.emit(kind, obj)

    def delete(self, name: str) -> None:
        self.rv += 1
        obj = self.pods.pop(name)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.emit("DELETED", obj)

    def end_watches(self) -> None:
        for q in self.watchers:
            q.put_nowait(_END)

    # the HTTP side

    async def _pods(self, request: Request) -> Response:
        if self.refusing:
            return JSONResponse({"kind": "Status", "code": 503}, status_code=503)
        self.auth.add(request.headers.get("authorization", ""))
        params = dict(request.query_params)
        if params.get("watch") not in ("1", "true"):
            self.lists.append(params)
            # two pages, to exercise `continue`
            items = sorted(self.pods.values(), key=lambda p: p["metadata"]["name"])
            if "continue" not in params and len(items) > 1:
                meta = {"resourceVersion": str(self.rv), "continue": "page2"}
                return JSONResponse({"kind": "PodList", "metadata": meta, "items": items[:1]})
            rest = items[1:] if "continue" in params else items
            return JSONResponse(
                {"kind": "PodList", "metadata": {"resourceVersion": str(self.rv)}, "items": rest}
            )
        self.watches.append(params)
        if self.gone_next_watch:
            self.gone_next_watch = False
            return JSONResponse({"kind": "Status", "code": 410, "reason": "Expired"}, status_code=410)
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.watchers.append(q)

        async def stream() -> AsyncIterator[bytes]:
            try:
                while (event := await q.get()) is not _END:
                    yield (json.dumps(event) + "\n").encode()
            finally:
                self.watchers.remove(q)

        return StreamingResponse(stream(), media_type="application/json")

    async def start(self) -> None:
        app = Starlette(routes=[Route("/api/v1/namespaces/{ns}/pods", self._pods)])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:  # noqa: ASYNC110 (uvicorn offers no event for it)
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            # an outage: refuse new requests, cut open watches (uvicorn's exit leaves them running)
            self.refusing = True
            while self.watchers:
                self.end_watches()
                await asyncio.sleep(0.01)
            self._server.should_exit = True
            self._server.force_exit = True
            await self._task
        self._server = self._task = None
        self.refusing = False


def kubeconfig(path: Path, port: int) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "t0ken"}}],
                "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u", "namespace": "llm"}}],
                "current-context": "ctx",
            }
        )
    )
    return path


@pytest.fixture
async def api() -> AsyncIterator[ScriptedApi]:
    server = ScriptedApi(free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def discovery(api: ScriptedApi, tmp_path: Path) -> AsyncIterator[KubernetesDiscovery]:
    config = KubernetesConfig(
        namespace="llm",
        label_selector="app=engine",
        kubeconfig=kubeconfig(tmp_path / "kubeconfig", api.port),
        backoff_initial=0.05,
        backoff_max=0.2,
    )
    d = KubernetesDiscovery(EngineRegistry(), config)
    d.start()
    try:
        yield d
    finally:
        await d.stop()


def urls(d: KubernetesDiscovery) -> list[str]:
    return sorted(st.url for st in d.registry.all())


async def test_list_then_watch_follows_pods(api: ScriptedApi, tmp_path: Path) -> None:
    api.put(pod("e-0", "10.0.0.1"))
    api.put(pod("e-1", "10.0.0.2", ready=False))
    api.put(pod("e-2", "10.0.0.3"))
    config = KubernetesConfig(
        namespace="llm", label_selector="app=engine", kubeconfig=kubeconfig(tmp_path / "kc", api.port)
    )
    d = KubernetesDiscovery(EngineRegistry(), config)
    d.start()
    try:
        async with asyncio.timeout(10):
            await d.wait_synced()
        assert urls(d) == ["http://10.0.0.1:8000", "http://10.0.0.3:8000"]
        assert api.lists[0]["labelSelector"] == "app=engine"
        assert api.auth == {"Bearer t0ken"}
        await until(lambda: len(api.watchers) == 1, "watching")
        assert api.watches[0]["resourceVersion"] == "103"  # from the list, all pages joined
        assert api.watches[0]["allowWatchBookmarks"] == "true"

        api.put(pod("e-1", "10.0.0.2"))  # becomes ready
        await until(lambda: len(urls(d)) == 3, "ready pod added")
        api.put(pod("e-0", "10.0.0.1", deleting=True))
        await until(
            lambda: urls(d) == ["http://10.0.0.2:8000", "http://10.0.0.3:8000"], "terminating removed"
        )
        api.delete("e-2")
        await until(lambda: urls(d) == ["http://10.0.0.2:8000"], "deleted removed")
        api.emit("BOOKMARK", {"kind": "Pod", "metadata": {"resourceVersion": "900"}})
        api.end_watches()  # the server ends the watch: resume from the bookmark, no re-list
        await until(lambda: len(api.watches) == 2, "re-watch")
        assert api.watches[1]["resourceVersion"] == "900"
        assert d.lists == 1
    finally:
        await d.stop()


async def test_error_event_and_410_relist(api: ScriptedApi, discovery: KubernetesDiscovery) -> None:
    api.put(pod("e-0", "10.0.0.1"))
    async with asyncio.timeout(10):
        await discovery.wait_synced()
    await until(lambda: len(api.watchers) == 1, "watching")

    api.emit("ERROR", {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"})
    await until(lambda: discovery.lists == 2, "re-list after an ERROR event")

    await until(lambda: len(api.watchers) == 1, "watching again")
    api.put(pod("e-1", "10.0.0.2"))
    await until(lambda: len(urls(discovery)) == 2, "events after the re-list")

    api.gone_next_watch = True
    api.end_watches()
    await until(lambda: discovery.lists == 3, "re-list after 410 on watch")
    assert urls(discovery) == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]


async def test_outage_keeps_the_engines_and_recovers(
    api: ScriptedApi, discovery: KubernetesDiscovery
) -> None:
    api.put(pod("e-0", "10.0.0.1"))
    async with asyncio.timeout(10):
        await discovery.wait_synced()
    state = discovery.registry.get("http://10.0.0.1:8000")
    await api.stop()
    lists = discovery.lists
    await asyncio.sleep(0.5)  # several failed re-lists with the test's short backoff
    assert discovery.registry.get("http://10.0.0.1:8000") is state  # still routable during the outage

    api.pods.clear()
    api.put(pod("e-5", "10.0.0.5"))  # the pod was replaced while we could not see
    await api.start()
    await until(lambda: urls(discovery) == ["http://10.0.0.5:8000"], "re-listed after the outage")
    assert discovery.lists == lists + 1
