"""The one shared upstream HTTP client, behind a small interface so backends can be swapped.

Which HTTP client runs where, and why (the one place this is written down):

- Engine requests, the router's hot path, go through aiohttp's client, driven directly here
  (``upstream_backend: aiohttp``, the default). Plain httpx's connection pool is the bottleneck
  under concurrency: in the reference measurement (``tests/reference/http-clients.md``, a thin
  proxy on this machine kind) httpx 0.28 served 539 req/s closed loop at 32 concurrent where
  aiohttp served 3,565 (6.6x), and 385 streams/s where aiohttp served 1,442 (3.7x). httpx's API
  over aiohttp's pool recovers most of that, but in the router httpx's request and response
  models then still took about 20% of its CPU (py-spy under ``kvstack bench router``), so this
  module calls aiohttp itself.
- ``upstream_backend: httpx`` is plain httpx, kept selectable as the reference implementation.
- The engine monitor's GETs (``/health`` probes, ``/metrics`` scrapes, ``/v1/models``) go through
  aiohttp too, in :mod:`kvstack.router.fetch`, on a session and pool of their own (proxied streams
  must never make a probe wait for a connection). Through httpx they were a fixed cost of several
  ms of CPU per second, most of the router's CPU at a few requests a second (issue #20).
- httpx stays where a shared client needs it, off the per-request path: the Kubernetes API
  (:mod:`kvstack.common.kube`, discovery), the engines' runtime LoRA endpoints
  (:class:`kvstack.common.lora.LoraClient`, shared with the operator; a few calls a minute), and the
  engine tokenizer's client when ``upstream_backend: httpx``.
- The benchmarks' load generators (``kvstack.bench``) use aiohttp, so the load costs less CPU
  than the router it measures.

Both behave the same: timeouts are enforced here, ``connect`` to open a connection, ``first_byte``
until the response headers arrive, ``idle`` between two body chunks; bodies are relayed as the
engine sent them (no compression asked, none undone); errors come out as :class:`UpstreamError`
with a kind the proxy decides on: ``connect`` (nothing was received: safe to retry elsewhere),
``timeout``, ``read`` and ``too_large``. An error's message is what a client may read: it never
names the engine's address (``detail``, for the router's own logs, does).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

import aiohttp
import httpx

Backend = Literal["aiohttp", "httpx"]
ErrorKind = Literal["connect", "timeout", "read", "too_large"]
Headers = Sequence[tuple[bytes, bytes]]


class UpstreamError(Exception):
    """The engine could not be reached, did not answer in time, or broke off its response."""

    def __init__(self, kind: ErrorKind, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.detail = detail or message  # may name the engine's URL: logs only


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    first_byte: float
    idle: float


class UpstreamResponse:
    """An open response: read it whole or chunk by chunk, and always :meth:`aclose` it."""

    __slots__ = ("content_type", "max_bytes", "retry_after", "status")

    def __init__(
        self, status: int, content_type: str | None, retry_after: str | None, max_bytes: int
    ) -> None:
        self.status = status
        self.content_type = content_type
        self.retry_after = retry_after  # the engine's Retry-After, passed on with its 429/503
        self.max_bytes = max_bytes  # the most :meth:`read` holds

    def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; ``UpstreamError`` on a broken or stalled body."""
        raise NotImplementedError

    async def read(self) -> bytes:
        """The whole body; ``UpstreamError("too_large")`` as soon as it passes ``max_bytes``."""
        parts: list[bytes] = []
        size, limit = 0, self.max_bytes
        async for chunk in self.chunks():
            size += len(chunk)
            if size > limit:
                raise UpstreamError("too_large", f"the engine's response is larger than {limit} bytes")
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def aclose(self) -> None:
        """Release the connection; closing before the end drops it, which aborts the engine's request."""
        raise NotImplementedError


_UNREACHABLE = "the engine could not be reached"


def _stalled(idle: float) -> UpstreamError:
    return UpstreamError("timeout", f"no data from the engine for {idle:g} s")


def _broke_off(err: Exception) -> UpstreamError:
    return UpstreamError("read", "the engine's response broke off", str(err) or type(err).__name__)


def _unreachable(url: str, err: Exception, *, timed_out: bool) -> UpstreamError:
    # nothing was sent: a connect failure, safe to retry on another engine. The client's message
    # never names the engine (a pod IP); the detail, for logs, does.
    why = "timed out" if timed_out else str(err) or type(err).__name__
    return UpstreamError(
        "connect", _UNREACHABLE, f"cannot {'connect to' if timed_out else 'reach'} {url}: {why}"
    )


class _HttpxResponse(UpstreamResponse):
    __slots__ = ("_idle", "_resp")

    def __init__(self, resp: httpx.Response, idle: float, max_bytes: int) -> None:
        headers = resp.headers
        super().__init__(resp.status_code, headers.get("content-type"), headers.get("retry-after"), max_bytes)
        self._resp = resp
        self._idle = idle

    async def chunks(self) -> AsyncIterator[bytes]:
        it = self._resp.aiter_raw().__aiter__()
        idle = self._idle
        while True:
            try:
                async with asyncio.timeout(idle):
                    chunk = await it.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise _stalled(idle) from None
            except httpx.HTTPError as err:
                raise _broke_off(err) from err
            if chunk:
                yield chunk

    async def aclose(self) -> None:
        # closing a broken connection may raise; it is closed either way
        with contextlib.suppress(Exception):
            await self._resp.aclose()


class IdleWatch:
    """Ends a read that has waited ``idle`` seconds for the engine, with one timer per response.

    ``asyncio.timeout`` around every read armed and cancelled a timer per chunk: for a streamed
    answer, one per token (py-spy: ~4% of the router's CPU on 100-token streams). Here a read only
    notes when it began waiting (:meth:`begin`, :meth:`end`); the timer is armed at the first wait and,
    when it fires, re-armed for the current wait's deadline, or cancels the reading task when that
    deadline has passed. Only time spent waiting counts: a reader busy relaying (a slow client) is
    not idle. The cancellation is turned into ``UpstreamError("timeout")`` by :meth:`stalled`, the
    way ``asyncio.timeout`` turns its own into ``TimeoutError``.
    """

    __slots__ = ("_cancelling", "_handle", "_loop", "_task", "fired", "idle", "since")

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._handle: asyncio.TimerHandle | None = None
        self.since: float | None = None  # when the current wait began; None: not waiting
        self.fired = False

    def begin(self) -> None:
        """The reader is about to wait for the engine."""
        self.since = now = self._loop.time()
        if self._handle is None:
            self._handle = self._loop.call_at(now + self.idle, self._check)

    def end(self) -> None:
        self.since = None

    def _check(self) -> None:
        self._handle = None
        since = self.since
        if since is None:
            return  # not waiting: the next wait arms the timer again
        due = since + self.idle
        if self._loop.time() >= due:
            self.fired = True
            self._task.cancel()
        else:
            self._handle = self._loop.call_at(due, self._check)

    def stalled(self) -> bool:
        """After a ``CancelledError`` in a wait: whether this watch caused it (and it is undone)."""
        return self.fired and self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class _AiohttpResponse(UpstreamResponse):
    __slots__ = ("_done", "_idle", "_resp", "_watch")

    def __init__(self, resp: aiohttp.ClientResponse, idle: float, max_bytes: int) -> None:
        headers = resp.headers
        super().__init__(resp.status, headers.get("Content-Type"), headers.get("Retry-After"), max_bytes)
        self._resp = resp
        self._idle = idle
        self._done = False
        self._watch: IdleWatch | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        content = self._resp.content
        # Bytes already buffered need no timer (a non-streamed body usually is whole by now).
        try:
            chunk = content.read_nowait()
        except aiohttp.ClientError as err:
            raise _broke_off(err) from err
        while True:
            if not chunk and not content.at_eof():
                watch = self._watch or self._new_watch()
                watch.begin()
                try:
                    chunk = await content.readany()
                except asyncio.CancelledError:
                    if watch.stalled():
                        raise _stalled(self._idle) from None
                    raise
                except aiohttp.ClientError as err:
                    raise _broke_off(err) from err
                finally:
                    watch.end()
            if not chunk:  # the end of a complete body; a broken one raises above
                self._done = True
                return
            yield chunk
            chunk = b""

    def _new_watch(self) -> IdleWatch:
        self._watch = watch = IdleWatch(self._idle)
        return watch

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.close()
        with contextlib.suppress(Exception):
            if self._done:
                self._resp.release()  # back to the pool
            else:
                self._resp.close()  # drop the connection: the engine sees the disconnect


def _limits(max_connections: int, keepalive_expiry: float) -> httpx.Limits:
    return httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=keepalive_expiry,
    )


class Upstream:
    """The process-wide client for engine requests. Create inside the event loop; :meth:`aclose` it."""

    def __init__(
        self,
        timeouts: Timeouts,
        *,
        backend: Backend = "aiohttp",
        max_connections: int = 2048,
        keepalive_expiry: float = 4.0,
        max_response_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.backend = backend
        self.max_response_bytes = max_response_bytes  # a response read whole; streams are relayed
        self.timeouts = timeouts
        # Streams hold a connection for their whole generation: size the pool for peak concurrency.
        self._httpx: httpx.AsyncClient | None = None
        self._aiohttp: aiohttp.ClientSession | None = None
        if backend == "aiohttp":
            self._aiohttp = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=keepalive_expiry),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect),
                auto_decompress=False,
                trust_env=False,
                # relay the engine's bytes as they are: never ask for compression
                skip_auto_headers=("Accept-Encoding",),
            )
        else:
            self._httpx = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(
                    limits=_limits(max_connections, keepalive_expiry), trust_env=False
                ),
                timeout=httpx.Timeout(connect=timeouts.connect, read=None, write=None, pool=None),
                trust_env=False,
                follow_redirects=False,
                headers={"accept-encoding": "identity"},
            )

    async def send(self, method: str, url: str, headers: Headers, body: bytes | None) -> UpstreamResponse:
        """Send a request and return once the response headers are in."""
        first_byte = self.timeouts.first_byte
        try:
            async with asyncio.timeout(first_byte):
                if self._aiohttp is not None:
                    return await self._send_aiohttp(self._aiohttp, method, url, headers, body)
                assert self._httpx is not None
                return await self._send_httpx(self._httpx, method, url, headers, body)
        except TimeoutError:
            raise UpstreamError("timeout", f"engine sent no response within {first_byte:g} s") from None

    async def _send_aiohttp(
        self, session: aiohttp.ClientSession, method: str, url: str, headers: Headers, body: bytes | None
    ) -> UpstreamResponse:
        hdrs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
        try:
            resp = await session.request(method, url, headers=hdrs, data=body, allow_redirects=False)
        except aiohttp.ClientError as err:
            raise _unreachable(url, err, timed_out=isinstance(err, aiohttp.ConnectionTimeoutError)) from err
        return _AiohttpResponse(resp, self.timeouts.idle, self.max_response_bytes)

    async def _send_httpx(
        self, client: httpx.AsyncClient, method: str, url: str, headers: Headers, body: bytes | None
    ) -> UpstreamResponse:
        request = client.build_request(method, url, headers=list(headers), content=body)
        try:
            resp = await client.send(request, stream=True)
        except httpx.HTTPError as err:
            # a timeout here is the connect timeout (no read or write timeout is set)
            raise _unreachable(url, err, timed_out=isinstance(err, httpx.TimeoutException)) from err
        return _HttpxResponse(resp, self.timeouts.idle, self.max_response_bytes)

    async def aclose(self) -> None:
        if self._aiohttp is not None:
            await self._aiohttp.close()
        if self._httpx is not None:
            await self._httpx.aclose()
