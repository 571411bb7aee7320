"""The router's HTTP server: uvicorn's httptools protocol, guarded against hostile connections.

uvicorn enforces none of these on its httptools protocol, and its h11 one only a header size, at
about twice the CPU per request. So the protocol is subclassed, and every guard acts on the socket
before the ASGI app sees a request (no task, no body, no routing for a refused one):

- **connections**: beyond ``max_client_connections`` open ones (all ports together), a new
  connection is answered ``503`` with ``Retry-After`` and closed. Counted before anything is read.
- **header bytes**: the request line and header block are fed to the parser at most
  ``max_header_bytes`` in all; one byte more and the client gets ``431``. The parser never holds
  more than that, so a 100 MB header costs what a 32 KB one does (it used to cost quadratic time
  in the parser's buffers, starving the event loop and every other client).
- **header count**: more than ``max_header_count`` fields: ``431``.
- **header timeout**: from a request's first byte, the whole header block must arrive within
  ``header_timeout_s`` or the client gets ``408`` (slowloris trickling a line every few seconds).
- **idle timeout**: a connection with no request in progress (new, or between keep-alive requests)
  is closed after ``client_idle_timeout_s`` without a word, as HTTP/1.1 allows.

Refusals are written in the OpenAI error shape with ``Connection: close``; then the write side is
shut and the socket lingers a moment before closing, so a client that already sent its request
reads the answer instead of a reset. Each is counted in ``kvstack_router_rejections_total``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import httptools
import msgspec
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kvstack.common.errors import error_body
from kvstack.router.config import RouterSettings
from kvstack.router.context import TRANSPORT_KEY

Refusal = Literal["connection_limit", "header_too_large", "header_timeout", "bad_request"]
LINGER_S = 2.0  # a refused connection's wait for the client to read the answer and close
CONNECTION_RETRY_AFTER_S = 1


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    """The socket-level limits, from :class:`RouterSettings` (validated there), and where refusals
    are counted."""

    max_connections: int
    max_header_bytes: int
    max_header_count: int
    header_timeout_s: float
    idle_timeout_s: float
    count_refusal: Callable[[Refusal], None]

    @classmethod
    def of(cls, settings: RouterSettings, count_refusal: Callable[[Refusal], None]) -> EdgeLimits:
        return cls(
            count_refusal=count_refusal,
            max_connections=settings.max_client_connections,
            max_header_bytes=settings.max_header_bytes,
            max_header_count=settings.max_header_count,
            header_timeout_s=settings.header_timeout_s,
            idle_timeout_s=settings.client_idle_timeout_s,
        )


def refusal_response(status: int, message: str, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 response in the OpenAI error shape that closes the connection."""
    body = msgspec.json.encode(error_body(status, message))
    head = [
        b"HTTP/1.1 %d %s" % (status, _REASONS[status]),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
    ]
    if retry_after is not None:
        head.append(b"retry-after: %d" % retry_after)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


class _TooManyHeaders(Exception):
    """Raised from the parser's headers-complete callback; the parser hands it back wrapped."""


class _UpgradeWithBody(Exception):
    """An Upgrade offer (``h2c``) on a request with a body, which httptools would not hand over."""


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if (name == b"content-length" and value.strip() != b"0") or name == b"transfer-encoding":
            return True
    return False


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the guards above. Made per server by :func:`protocol_for`."""

    limits: ClassVar[EdgeLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the next bytes belong to a request line or header block
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport
            message = f"the router is at its limit of {self.limits.max_connections} open connections"
            self._refuse("connection_limit", refusal_response(503, message, CONNECTION_RETRY_AFTER_S))
            return
        super().connection_made(transport)
        # uvicorn arms its keep-alive timer only after a response: a fresh connection gets it here
        self.timeout_keep_alive_task = self.loop.call_later(
            self.limits.idle_timeout_s, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # a refused client's request is read and dropped until it closes
        self._unset_keepalive_if_required()
        try:
            if not self._in_head:
                self.parser.feed_data(data)
            elif len(data) <= self.limits.max_header_bytes - self._head_bytes:
                # nearly every request: the chunk cannot take the head past its limit, so it is fed
                # whole (what follows the head in it, a body or the next request, is not counted)
                self._head_bytes += len(data)
                self.parser.feed_data(data)
            else:
                self._feed_head_piecewise(memoryview(data))
            if self._in_head and self._head_bytes and self._head_timer is None:
                # a head still incomplete after its first chunk (only then: a timer per request
                # would cost every request); measured from that chunk, i.e. the request's first byte
                self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_late)
        except httptools.HttpParserCallbackError as err:
            if isinstance(err.__context__, _TooManyHeaders):
                self._refuse_header(f"the request has more than {self.limits.max_header_count} header fields")
                return
            if isinstance(err.__context__, _UpgradeWithBody):
                self._bad_request("a request with a body cannot offer Upgrade (e.g. h2c); send it without")
                return
            self._bad_request()
        except httptools.HttpParserUpgrade:
            # uvicorn's handling: with websockets off (ws="none") the request is served as plain
            # HTTP/1.1 (e.g. curl's `Upgrade: h2c`), only a warning is logged
            self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            self._bad_request()

    def _feed_head_piecewise(self, view: memoryview) -> None:
        """Feed at most the head's remaining room; past it, 431 without parsing another byte."""
        while view and not self._refused:
            if not self._in_head:
                self.parser.feed_data(view)
                return
            room = self.limits.max_header_bytes - self._head_bytes
            if room <= 0:
                self._refuse_header(
                    f"the request line and headers exceed {self.limits.max_header_bytes} bytes"
                )
                return
            piece, view = view[:room], view[room:]
            self._head_bytes += len(piece)
            self.parser.feed_data(piece)  # may end the head (on_headers_complete) mid-piece

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # the compiled relay writes a stream's events to this connection's socket (router/relay.py)
        self.scope[TRANSPORT_KEY] = self.transport  # type: ignore[literal-required]

    def on_headers_complete(self) -> None:
        # the count is checked once the head is parsed: the byte limit already bounds the work
        if len(self.headers) > self.limits.max_header_count:
            raise _TooManyHeaders
        if self.parser.should_upgrade() and _has_body(self.headers):
            raise _UpgradeWithBody  # the parser stops at an Upgrade offer: its body would be lost
        self._in_head = False
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        # whatever follows is the next request's head: count it from zero
        self._in_head, self._head_bytes = True, 0
        super().on_message_complete()

    # ------------------------------------------------------------------ refusals

    def _head_late(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a pipelined head behind a running response: the next byte re-arms the timer
        if self._in_head and not self._refused and not self.transport.is_closing():
            message = f"the request headers were not received within {self.limits.header_timeout_s:g} s"
            self._refuse("header_timeout", refusal_response(408, message))

    def _refuse_header(self, message: str) -> None:
        self._refuse("header_too_large", refusal_response(431, message))

    def _bad_request(self, message: str = "invalid HTTP request") -> None:
        # uvicorn's own 400 is plain text; clients of an OpenAI API get its error shape
        self._refuse("bad_request", refusal_response(400, message))

    def _refuse(self, reason: Refusal, response: bytes) -> None:
        """Answer, stop reading requests, and close once the client has read it (or after a linger)."""
        self._refused = True
        self._stop_head_timer()
        self._unset_keepalive_if_required()
        self.limits.count_refusal(reason)
        transport = self.transport
        if self.cycle is not None and not self.cycle.response_complete:
            transport.close()  # a pipelined request behind a response still being sent: no room for ours
            return
        transport.write(response)
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(LINGER_S, transport.close)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


def protocol_for(limits: EdgeLimits) -> type[GuardedProtocol]:
    """A :class:`GuardedProtocol` class bound to one server's limits (uvicorn makes the instances)."""

    class BoundProtocol(GuardedProtocol):
        pass

    BoundProtocol.limits = limits
    return BoundProtocol


class RouterServer(uvicorn.Server):
    """uvicorn's server, its housekeeping loop woken once a second instead of ten times.

    uvicorn wakes every 0.1 s to see whether it should exit and, every tenth time, to renew the
    ``Date`` header: on this project's machine ~1.3 ms of CPU a second (an idle router used 1.8 ms
    a second with no engines, 0.5 ms with this loop; a bare uvicorn app 2.5 ms), which on a GPU
    host's multi-round chat at ~4 requests a second is ~0.3 ms of the router's ~11 ms a request
    (issue #20, bench-results/router, "Woken once a second"). Here it wakes once a second (the
    header keeps its one-second resolution), and at once when told to exit: setting
    ``should_exit`` (a signal's handler, a worker's supervisor, a test) wakes the loop, from any
    thread.
    """

    tick_s: ClassVar[float] = 1.0

    def __init__(self, config: uvicorn.Config) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        super().__init__(config)

    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        counter = 0
        while not await self.on_tick(counter) and not self.should_exit:
            counter = (counter + 10) % 864_000  # uvicorn renews the Date header when counter % 10 == 0
            try:
                async with asyncio.timeout(self.tick_s):
                    await self._wake.wait()
            except TimeoutError:
                pass


def make_server(
    settings: RouterSettings,
    app: Any,
    count_refusal: Callable[[Refusal], None],
    headers: Sequence[tuple[str, str]] = (),
) -> RouterServer:
    """The uvicorn server for ``app`` with the guarded protocol; run it on :func:`listen_sockets`.
    ``headers`` go on every response (a worker's id, router/workers.py)."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=protocol_for(EdgeLimits.of(settings, count_refusal)),
        lifespan="on",
        ws="none",  # the router serves no websockets
        # the client address is the peer's: X-Forwarded-For gets it appended, never replaced by it
        proxy_headers=False,
        access_log=False,  # the router logs one JSON line per request itself
        log_config=None,
        # idle keep-alive connections; longer than clients' pools usually keep idle sockets, so they
        # are not reused half-closed
        timeout_keep_alive=int(settings.client_idle_timeout_s) or 1,
        timeout_graceful_shutdown=30,
        backlog=min(settings.max_client_connections, 4096),
        headers=list(headers),
    )
    return RouterServer(config)


def _ports(settings: RouterSettings) -> list[int]:
    return [settings.port] if settings.metrics_port is None else [settings.port, settings.metrics_port]


def listen_sockets(settings: RouterSettings, *, reuse_port: bool = False) -> list[socket.socket]:
    """The API socket, and the metrics one when ``metrics_port`` is set (same host). ``reuse_port``:
    bound with ``SO_REUSEPORT`` beside the other workers' (router/workers.py): the kernel spreads
    new connections over every listening socket of the port."""
    if not reuse_port:
        # log_config=None: a Config's default installs uvicorn's own plain access log, a line per request
        return [
            uvicorn.Config("", host=settings.host, port=port, log_config=None).bind_socket()
            for port in _ports(settings)
        ]
    return [_reuse_port_socket(settings.host, port) for port in _ports(settings)]


def reserve_ports(settings: RouterSettings) -> list[socket.socket]:
    """Bound, never listening, ``SO_REUSEPORT`` sockets holding the API (and metrics) port for the
    workers: port 0 resolves here once, and no other program takes the port while workers restart.
    A socket that does not listen is never handed a connection."""
    return [_reuse_port_socket(settings.host, port) for port in _ports(settings)]


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
