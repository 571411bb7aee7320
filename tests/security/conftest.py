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
from tests.conftest import free_port
from tests.router.conftest import MODEL, RouterServer, router, router_factory, sims

from kvstack.router.server import listen_sockets, make_server

__all__ = ["router", "sims"]

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


class ScriptedEngine:
    """A real HTTP/1.1 server that answers probes like an engine serving MODEL, and each POST with
    what ``answer(method, path, headers, body)`` writes: raw bytes, or an async function of the
    stream writer (for bodies sent in pieces). Every POST's headers are kept in ``seen``.

    ``models_hang``: ``/v1/models`` never answers (an engine the router cannot learn models from).
    """

    def __init__(self, answer: Answer, models_hang: bool = False) -> None:
        self.answer = answer
        self.models_hang = models_hang
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.seen: list[dict[str, str]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._serve(),), daemon=True
        )
        self._stop: asyncio.Event | None = None

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines:
                    if line:
                        name, _, value = line.partition(":")
                        key = name.strip().lower()
                        headers[key] = f"{headers[key]}\n{value.strip()}" if key in headers else value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if method == "GET":
                    if path == "/v1/models" and self.models_hang:
                        await asyncio.Event().wait()
                    text = b"{}"
                    if path == "/v1/models":
                        text = b'{"object":"list","data":[{"id":"%s","object":"model"}]}' % MODEL.encode()
                    elif path == "/metrics":
                        text = b""
                    writer.write(reply(200, text))
                else:
                    self.seen.append(headers)
                    out = self.answer(method, path, headers, body)
                    if isinstance(out, bytes):
                        writer.write(out)
                    else:
                        await out(writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def __enter__(self) -> ScriptedEngine:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


def reply(status: int, body: bytes, *extra: tuple[str, str], content_type: str = "application/json") -> bytes:
    head = f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in extra)
    return head.encode() + b"\r\n" + body


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
