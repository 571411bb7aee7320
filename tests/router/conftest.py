"""Router test harness: real simulator processes, the router served by uvicorn in a thread, and
small real TCP servers that behave badly (hang, stall, fail) the way broken engines do."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx
import msgspec
import pytest
import uvicorn
import yaml
from tests.conftest import free_port

from kvstack.common.procs import ManagedProcess
from kvstack.common.waits import wait_until
from kvstack.engine.sim.cli import kv_events_flags
from kvstack.router.app import create_app
from kvstack.router.config import RouterSettings, load_settings
from kvstack.router.context import RouterContext
from kvstack.router.discovery.static import sim_engine_entry
from kvstack.router.prompts import PromptWork, prompt_work
from kvstack.router.protocol import parse_request

MODEL = "kvstack/sim-8b"
KVSTACK = str(Path(sys.executable).with_name("kvstack"))
FAST_MONITOR = {"probe_interval": 0.2, "probe_timeout": 0.5, "scrape_interval": 0.2, "models_interval": 5.0}


def chat_work(messages: list[dict[str, Any]], model: str = MODEL) -> PromptWork:
    """The router's cache keys of a chat: the whole prompt's digest and its messages' (``parts``)."""
    work = prompt_work(parse_request("chat", msgspec.json.encode({"model": model, "messages": messages})))
    assert isinstance(work, PromptWork)
    return work


@dataclass
class Sim:
    url: str
    proc: ManagedProcess

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


@contextmanager
def run_sims(
    tmp: Path,
    count: int,
    *extra: str,
    env: dict[str, str] | None = None,
    each: Callable[[int], Sequence[str]] = lambda i: (),
) -> Iterator[list[Sim]]:
    """``count`` simulators started with ``extra`` flags, simulator ``i``'s own flags ``each(i)`` and
    ``env``, ready; stopped on exit."""
    sims = []
    try:
        for i in range(count):
            port = free_port()
            argv = [KVSTACK, "engine", "sim", "--port", str(port), *extra, *each(i)]
            ready = f"http://127.0.0.1:{port}/health"
            proc = ManagedProcess(f"sim-{port}", argv, tmp, env=env, ready_url=ready)
            sims.append(Sim(f"http://127.0.0.1:{port}", proc.start()))
        for sim in sims:
            sim.proc.wait_ready(30)
        yield sims
    finally:
        for sim in sims:
            sim.proc.stop()


@contextmanager
def run_event_sims(
    tmp: Path, *extra: str, count: int = 2, block_size: int = 16, env: dict[str, str] | None = None
) -> Iterator[tuple[list[Sim], Path]]:
    """``count`` fast simulators publishing KV events, named engine-0.., and the
    engines file that names their endpoints; ``extra`` flags and ``env`` go to every simulator."""
    sims: list[Sim] = []
    entries: list[dict[str, Any]] = []
    try:
        for i in range(count):
            port, pub, replay = free_port(), free_port(), free_port()
            argv = [
                KVSTACK, "engine", "sim", "--port", str(port), "--speed", "20", "--block-size",
                str(block_size), *kv_events_flags(pub, replay), *extra,
            ]  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            proc = ManagedProcess(f"sim-{i}", argv, tmp, env=env, ready_url=f"{url}/health")
            sims.append(Sim(url, proc.start()))
            entries.append(sim_engine_entry(f"engine-{i}", http=port, kv_events=pub, kv_replay=replay))
        for sim in sims:
            sim.proc.wait_ready(30)
        engines_file = tmp / "engines.yaml"
        engines_file.write_text(yaml.safe_dump(entries))
        yield sims, engines_file
    finally:
        for sim in sims:
            sim.proc.stop()


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Sim]]:
    """Two simulators at real-time speed, shared by a module's tests."""
    with run_sims(tmp_path_factory.mktemp("sims"), 2) as running:
        yield running


@pytest.fixture
def slow_sims(tmp_path: Path) -> Iterator[list[Sim]]:
    """Two simulators at a tenth of real time: streams last seconds (killable, cancellable)."""
    with run_sims(tmp_path, 2, "--speed", "0.1") as running:
        yield running


class RouterServer:
    """The router app under uvicorn in a background thread, on a free loopback port."""

    def __init__(self, settings: RouterSettings) -> None:
        self.app = create_app(settings)
        self.ctx: RouterContext = self.app.app.state.ctx
        self.port = settings.port
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, lifespan="on", log_config=None, access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> RouterServer:
        self.thread.start()

        def started() -> bool:
            if not self.server.started and not self.thread.is_alive():
                raise RuntimeError("router did not start: its thread ended")
            return self.server.started

        try:
            wait_until(started, "the router to start", 10, 0.01)
        except AssertionError as exc:
            raise RuntimeError(f"router did not start: {exc}") from None
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def wait_available(self, count: int, timeout: float = 10.0) -> None:
        def enough() -> bool:
            now = self.ctx.clock()
            return sum(e.available(now) for e in self.ctx.registry.all()) >= count

        try:
            wait_until(enough, f"{count} engines available", timeout, 0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.ctx.registry.all()}") from None

    def metric(self, name: str, **labels: str) -> float:
        value = self.ctx.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


RouterFactory = Callable[..., RouterServer]
R = TypeVar("R", bound=RouterServer)


@pytest.fixture(params=["aiohttp", "httpx"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each upstream backend in turn: they must behave the same."""
    return str(request.param)


@contextmanager
def router_factory(kind: type[R]) -> Iterator[Callable[..., R]]:
    """``make(engines=[...], **settings)`` starts a ``kind`` router and waits for its engines; all
    are stopped on exit. One factory for the plain router and the guarded one (tests/security)."""
    started: list[R] = []

    def make(*, available: int | None = None, **values: Any) -> R:
        values.setdefault("monitor", FAST_MONITOR)
        values.setdefault("access_log", False)
        server = kind(load_settings(port=free_port(), **values))
        server.start()
        started.append(server)
        if available is None:
            available = len(values.get("engines", []))
        if available:
            server.wait_available(available)
        return server

    try:
        yield make
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def router() -> Iterator[RouterFactory]:
    """``router(engines=[...], **settings)`` starts a router; all are stopped after the test."""
    with router_factory(RouterServer) as make:
        yield make


_COMPLETION = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":0,"model":"%s","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"x"},"finish_reason":"length"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}' % MODEL.encode()
)


def reply(status: int, body: bytes, *extra: tuple[str, str], content_type: str = "application/json") -> bytes:
    """One whole HTTP/1.1 response: ``status``, ``body``, and any ``extra`` headers."""
    head = f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in extra)
    return head.encode() + b"\r\n" + body


def _request_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """(method, path, headers) of a request head; header names in lowercase, a repeated header's
    values joined by newlines."""
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, path, _ = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}\n{value.strip()}" if key in headers else value.strip()
    return method, path, headers


class RawEngine:
    """A real HTTP/1.1 server, on a free port in a thread of its own, that answers probes like an
    engine serving MODEL (``/v1/models`` lists it, ``/metrics`` is empty, any other GET is ``{}``;
    ``probes`` counts ``/health``) and each POST as :meth:`post` writes it, after keeping its
    headers in ``post_headers``. A context manager: serving inside the ``with`` block."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.probes = 0
        self.post_headers: list[dict[str, str]] = []  # each POST's headers, names in lowercase
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop: asyncio.Event | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def get(self, path: str) -> bytes:
        """The answer to ``GET path``."""
        if path == "/health":
            self.probes += 1
        if path == "/v1/models":
            return reply(200, b'{"object":"list","data":[{"id":"%s","object":"model"}]}' % MODEL.encode())
        return reply(200, b"" if path == "/metrics" else b"{}")

    async def post(
        self, method: str, path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> None:
        """Answer one POST (or other non-GET request) on ``writer``."""
        raise NotImplementedError

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            for task in self._handlers:
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                method, path, headers = _request_head(await reader.readuntil(b"\r\n\r\n"))
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if method == "GET":
                    writer.write(await self.get(path))
                else:
                    self.post_headers.append(headers)
                    await self.post(method, path, headers, body, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    def __enter__(self) -> Self:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


class BadEngine(RawEngine):
    """An engine that answers probes but misbehaves on POSTs.

    ``mode``: ``hang`` (never answers), ``stall`` (starts an SSE stream, then goes silent),
    ``status:<code>`` (answers every POST with that status and an OpenAI error body),
    ``flaky:<code>`` (every other POST, from the first: that status; the others a chat completion),
    ``no_tokenize`` (``/tokenize`` answers 500; other POSTs a one-token chat completion).
    """

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.posts = 0
        self.post_times: list[float] = []  # time.monotonic() of each POST's arrival

    async def post(
        self, method: str, path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> None:
        self.posts += 1
        self.post_times.append(time.monotonic())
        if self.mode == "no_tokenize":
            no_tokenizer = reply(500, b'{"error":{"message":"no tokenizer","code":500}}')
            writer.write(no_tokenizer if path == "/tokenize" else reply(200, _COMPLETION))
            return
        if self.mode == "hang":
            await asyncio.Event().wait()
        if self.mode == "stall":
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            frame = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
            writer.write(b"%x\r\n%s\r\n" % (len(frame), frame))
            await writer.drain()
            await asyncio.Event().wait()
        status = int(self.mode.split(":", 1)[1])
        if self.mode.startswith("flaky:") and self.posts % 2 == 0:
            writer.write(reply(200, _COMPLETION))
            return
        writer.write(reply(status, b'{"error":{"message":"engine failure","type":"X","code":%d}}' % status))
