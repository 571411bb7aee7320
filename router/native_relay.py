"""The compiled stream relay's asyncio face: one engine exchange on a native thread (router/native).

:func:`open_native` sends a request the way :meth:`kvstack.router.upstream.Upstream.send` does and
returns a :class:`NativeResponse` once the head is in. Its body can be read in Python
(:meth:`NativeResponse.chunks`, like any :class:`UpstreamResponse`) and, from any point on, handed to
the thread with :meth:`NativeResponse.forward`: the thread then writes the rest straight to the
client socket, so a streamed answer costs no Python per event after its first token.

The thread talks to the loop only through an eventfd (``wake_fd``) watched with ``loop.add_reader``
and an event queue (``poll``). Errors come out as :class:`UpstreamError` with the same kinds and the
same rule as upstream.py: the message never names the engine, the detail (logs only) does.

:func:`available` is False where the extension was not built (no Rust toolchain at install):
the pure-Python relay (upstream.py) is the reference and is used then.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import sys
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal, cast
from urllib.parse import urlsplit

from kvstack.router.upstream import Headers, Timeouts, UpstreamError, UpstreamResponse

if TYPE_CHECKING:
    from kvstack.router._relay import Exchange

Outcome = Literal["end", "read", "timeout", "too_large", "client_gone", "client_stalled", "cancelled"]
Event = tuple[object, ...]

# Headers this module writes itself: the caller's copies would contradict the request's framing.
_OWN_HEADERS = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})


def _load() -> ModuleType | None:
    try:
        from kvstack.router import _relay
    except ImportError:
        pass
    else:
        return _relay
    # The strict editable install (make venv) links only the package's files into its tree, while
    # the in-place build leaves the extension beside the real sources: load it from there.
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_relay{suffix}"
        spec = importlib.util.spec_from_file_location("kvstack.router._relay", path)
        if not path.is_file() or spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[spec.name] = module
        return module
    return None


_native = _load()


def available() -> bool:
    """Whether the compiled relay is built and importable here."""
    return _native is not None


def clear_pool() -> None:
    """Closes the native pool's idle engine connections (tests count descriptors)."""
    if _native is not None:
        _native.clear_pool()


def forwarding_thread() -> bool:
    """Starts the one thread that writes every forwarded body (else started by the first forward, with
    its two descriptors, for the process's lifetime: tests count descriptors); whether it runs."""
    return _native is not None and bool(_native.forwarding_thread())


@dataclass(frozen=True, slots=True)
class Forwarded:
    """How a forward ended: the body bytes written to the client (chunk framing not counted), and
    why it stopped (``end``: the whole body; ``read``, ``timeout``, ``too_large``: the engine's side;
    ``client_gone``, ``client_stalled``: the client's; ``cancelled``: :meth:`NativeResponse.aclose`).

    ``tail``: with ``max_event`` (SSE framing), the ``[DONE]`` event that ended the body, held back
    by the thread and not written (nor counted): the caller writes it, at ``end`` with the stream's
    end in one write, so a client that closes on ``[DONE]`` never closes before the end is written.
    After the engine's failures it is reported too; after the client's or a cancel it is dropped."""

    nbytes: int
    outcome: Outcome
    tail: bytes = b""


class _Feed:
    """The exchange's events, awaited through its wake fd: one waiter at a time.

    The fd is watched only while someone waits: it stays readable until the next poll(), so a reader
    left registered while the consumer is busy elsewhere (writing to a slow client) would run its
    callback on every turn of the loop."""

    __slots__ = ("_fd", "_loop", "_waiter", "closed", "ex", "pending")

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self._loop = asyncio.get_running_loop()
        self._fd = ex.wake_fd()
        self._waiter: asyncio.Future[None] | None = None
        self.pending: deque[Event] = deque()
        self.closed = False

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> Event:
        while not self.pending:
            events = self.ex.poll()
            if events:
                self.pending.extend(events)
                break
            if self._waiter is not None:
                raise RuntimeError("the exchange is already being awaited")
            if self.closed:
                raise RuntimeError("the exchange is closed")
            self._waiter = self._loop.create_future()
            self._loop.add_reader(self._fd, self._wake)
            try:
                await self._waiter
            finally:
                self._waiter = None
                self._loop.remove_reader(self._fd)
        return self.pending.popleft()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.ex.cancel()  # ends the thread; a connection still in use is dropped, not pooled


class NativeResponse(UpstreamResponse):
    """An engine's response read by a native thread; always :meth:`aclose` it."""

    __slots__ = ("_detail", "_done", "_feed", "_idle", "headers")

    def __init__(
        self,
        feed: _Feed,
        status: int,
        headers: list[tuple[bytes, bytes]],
        idle: float,
        max_bytes: int,
        detail: str,
    ) -> None:
        found = {k.lower(): v.decode("latin-1") for k, v in headers}
        super().__init__(status, found.get(b"content-type"), found.get(b"retry-after"), max_bytes)
        self.headers = headers
        self._feed = feed
        self._idle = idle
        self._detail = detail  # the engine's URL, for error details only
        self._done = False

    def _error(self, event: Event) -> UpstreamError:
        kind, message = cast(str, event[1]), cast(str, event[2])
        return _error(kind, message, self._detail, self._idle, self.max_bytes)

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self._done:
            event = await self._feed.next()
            if event[0] == "data":
                yield cast(bytes, event[1])
            elif event[0] == "end":
                self._done = True
            elif event[0] == "error":
                self._done = True
                raise self._error(event)

    async def forward(self, fd: int, *, chunked: bool) -> Forwarded:
        """Hands the rest of the body to the native thread, which writes it to the client socket
        ``fd`` framed as HTTP/1.1 chunks when ``chunked`` (never the last, empty one: the server
        writes that after, with :attr:`Forwarded.tail`). Body bytes already polled but not yet
        returned by :meth:`chunks` go first. Returns when the thread is done with the socket.

        The caller's transport must have nothing buffered for ``fd`` (the thread's writes would pass
        it) and must not write to it until this returns. The thread writes through its own duplicate
        of the descriptor, so the server closing ``fd`` meanwhile is safe (the write then fails:
        ``client_gone``). A cancelled forward stops the thread and waits for it before it re-raises.
        """
        unsent = [cast(bytes, e[1]) for e in self._feed.pending if e[0] == "data"]
        self._feed.pending.clear()  # an end or error in there comes back as the forward's outcome
        self._feed.ex.forward(fd, chunked, unsent)
        interrupted: BaseException | None = None
        while True:
            try:
                event = await self._feed.next()
            except asyncio.CancelledError as err:
                # never leave the thread writing to a socket its owner believes released
                interrupted = interrupted or err
                self._feed.ex.cancel()
                continue
            if event[0] == "forwarded":
                break
        self._done = True
        if interrupted is not None:
            raise interrupted
        return Forwarded(cast(int, event[1]), cast(Outcome, event[2]), cast(bytes, event[3]))

    def cancel(self) -> None:
        """Aborts the exchange (a pending :meth:`forward` returns ``cancelled``); :meth:`aclose` still."""
        self._feed.ex.cancel()

    async def aclose(self) -> None:
        self._feed.close()


def _error(kind: str, message: str, detail: str, idle: float, max_bytes: int) -> UpstreamError:
    """The client-facing error for a native one; the native message (with the address) is detail."""
    where = f"{detail}: {message}"
    if kind == "connect":
        return UpstreamError("connect", "the engine could not be reached", where)
    if kind == "timeout":
        return UpstreamError("timeout", f"no data from the engine for {idle:g} s", where)
    if kind == "too_large":
        return UpstreamError("too_large", f"the engine's response is larger than {max_bytes} bytes", where)
    return UpstreamError("read", "the engine's response broke off", where)


def build_request(method: str, url: str, headers: Headers, body: bytes | None) -> tuple[str, int, bytes]:
    """The host, port and complete HTTP/1.1 request bytes for ``url`` (http:// only)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"the native relay speaks plain http:// only, not {url!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n".encode("latin-1")]
    for name, value in headers:
        if b"\r" in name or b"\n" in name or b"\r" in value or b"\n" in value or b":" in name:
            raise ValueError(f"a header that would break the request: {name!r}")
        if name.lower() not in _OWN_HEADERS:
            lines.append(b"%s: %s\r\n" % (name, value))
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Length: %d\r\n" % len(body or b""))
    lines.append(b"\r\n")
    if body:
        lines.append(body)
    return parts.hostname, parts.port or 80, b"".join(lines)


async def open_native(
    method: str,
    url: str,
    headers: Headers,
    body: bytes | None,
    *,
    timeouts: Timeouts,
    max_bytes: int,
    pool_idle_s: float = 4.0,
    max_event: int = 0,
) -> NativeResponse:
    """Sends the request (arguments as :meth:`Upstream.send`) and returns once the head is in,
    waiting at most ``timeouts.first_byte`` for it. ``max_event`` > 0 bounds each SSE event of the
    body (``too_large``), as the Python relay's ``SSEFramer`` does, and has a forward hold back the
    body's ``[DONE]`` event (:attr:`Forwarded.tail`); ``max_bytes`` bounds the whole body."""
    if _native is None:
        raise RuntimeError("the native relay is not built (router/native)")
    host, port, request = build_request(method, url, headers, body)
    idle, connect = timeouts.idle, timeouts.connect
    ex: Exchange = _native.Exchange(host, port, request, connect, idle, max_bytes, pool_idle_s, max_event)
    feed = _Feed(ex)
    try:
        async with asyncio.timeout(timeouts.first_byte):
            event = await feed.next()
    except TimeoutError:
        feed.close()
        raise UpstreamError(
            "timeout", f"engine sent no response within {timeouts.first_byte:g} s", f"{url}: no head"
        ) from None
    except BaseException:
        feed.close()
        raise
    if event[0] == "head":
        headers_in = cast(list[tuple[bytes, bytes]], event[2])
        return NativeResponse(feed, cast(int, event[1]), headers_in, timeouts.idle, max_bytes, url)
    feed.close()
    raise _error(cast(str, event[1]), cast(str, event[2]), url, timeouts.idle, max_bytes)
