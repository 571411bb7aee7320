""":class:`KubeClient` for synchronous code (the test harness, benchmarks, CLIs).

The async client runs on a private event loop in a daemon thread; each method blocks on its result.
One client, so one way to authenticate, retry and report errors, whichever side calls it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from kvstack.common.kube.client import KubeClient, Obj, ObjectList
from kvstack.common.kube.credentials import Credentials

T = TypeVar("T")


class BlockingKube:
    """The methods of :class:`KubeClient`, blocking. Close with :meth:`close` (or ``with``)."""

    def __init__(self, credentials: Credentials, *, timeout: float = 30.0) -> None:
        self.credentials = credentials
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kube-blocking", daemon=True)
        self._thread.start()
        self._kube = self._call(self._open(credentials, timeout))

    @staticmethod
    async def _open(credentials: Credentials, request_timeout: float) -> KubeClient:
        return KubeClient(credentials, timeout=request_timeout)  # its connection pool belongs to this loop

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self._kube.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> BlockingKube:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kw: Any) -> Obj | None:
        return self._call(self._kube.request(method, path, **kw))

    def get(self, path: str) -> Obj | None:
        return self._call(self._kube.get(path))

    def create(self, path: str, body: Obj) -> Obj:
        return self._call(self._kube.create(path, body))

    def delete(self, path: str, *, propagation: str = "Background") -> None:
        self._call(self._kube.delete(path, propagation=propagation))

    def apply(self, path: str, obj: Obj, *, manager: str, force: bool = True) -> Obj:
        return self._call(self._kube.apply(path, obj, manager=manager, force=force))

    def merge_patch(self, path: str, patch: Obj, *, manager: str | None = None) -> Obj:
        return self._call(self._kube.merge_patch(path, patch, manager=manager))

    def scale(self, path: str, replicas: int, *, manager: str | None = None) -> Obj:
        return self._call(self._kube.scale(path, replicas, manager=manager))

    def list(self, path: str, *, label_selector: str = "") -> ObjectList:
        return self._call(self._kube.list(path, label_selector=label_selector))
