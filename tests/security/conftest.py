"""Security and bad-input harness: the router test harness's simulators and routers, shared, plus
the router behind its real server (``edge``: router/server.py's guards, as ``kvstack router`` runs
it) and a scriptable engine that answers however a test needs (``ScriptedEngine``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from tests.router.conftest import MODEL, RawEngine, RouterServer, reply, router, router_factory, sims

from kvstack.router.server import listen_sockets, make_server

__all__ = ["reply", "router", "sims"]

OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


class EdgeRouter(RouterServer):
    """The router app served by :func:`kvstack.router.server.make_server`, in a thread."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.server = make_server(settings, self.app, self.ctx.metrics.reject)
        sockets = listen_sockets(settings)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": sockets}, daemon=True)


EdgeFactory = Callable[..., EdgeRouter]


@pytest.fixture
def edge() -> Iterator[EdgeFactory]:
    """``edge(engines=[...], **settings)`` starts a guarded router; all are stopped after the test."""
    with router_factory(EdgeRouter) as make:
        yield make


def assert_openai_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    """``resp`` is a ``status`` in the OpenAI error shape; returns its ``error`` object."""
    assert resp.status_code == status, resp.text[:300]
    error = resp.json()["error"]
    assert set(error) == OPENAI_ERROR_KEYS and error["code"] == status, error
    if status in (429, 503):
        assert int(resp.headers["retry-after"]) >= 1
    return dict(error)


def parse_raw_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP/1.1 response read off a raw socket."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ")[1]), headers, body


Answer = Callable[[str, str, dict[str, str], bytes], Any]


class ScriptedEngine(RawEngine):
    """An engine (:class:`~tests.router.conftest.RawEngine`) that answers each POST with what
    ``answer(method, path, headers, body)`` writes: raw bytes, or an async function of the stream
    writer (for bodies sent in pieces).

    ``models_hang``: ``/v1/models`` never answers (an engine the router cannot learn models from).
    """

    def __init__(self, answer: Answer, models_hang: bool = False) -> None:
        super().__init__()
        self.answer = answer
        self.models_hang = models_hang

    async def get(self, path: str) -> bytes:
        if path == "/v1/models" and self.models_hang:
            await asyncio.Event().wait()
        return await super().get(path)

    async def post(
        self, method: str, path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> None:
        out = self.answer(method, path, headers, body)
        if isinstance(out, bytes):
            writer.write(out)
        else:
            await out(writer)


COMPLETION = (
    b'{"id":"cmpl-1","object":"text_completion","created":0,"model":"%s","choices":[{"index":0,'
    b'"text":"x","finish_reason":"length"}],"usage":{"prompt_tokens":1,"completion_tokens":1,'
    b'"total_tokens":2}}' % MODEL.encode()
)


class GoodClient:
    """A well-behaved client sending completions one after another (each on a fresh connection,
    so it also needs the router to accept connections) while abuse runs; ``statuses`` is what it got."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.headers = headers or {}
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"model": MODEL, "prompt": "good", "max_tokens": 1}
        while not self._stop.is_set():
            try:
                resp = httpx.post(f"{self.url}/v1/completions", json=body, headers=self.headers, timeout=30)
                self.statuses.append(resp.status_code)
            except httpx.HTTPError:
                self.statuses.append(0)

    def __enter__(self) -> GoodClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def served(self, count: int) -> bool:
        """At least ``count`` answers, every one a 200 (a failure fails the caller at once)."""
        assert all(s == 200 for s in self.statuses), self.statuses
        return len(self.statuses) >= count
