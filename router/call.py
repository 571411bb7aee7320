"""One proxied request on its way through the router (:class:`Call`) and one try of it (:class:`Attempt`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvstack.router.admission import Demand
from kvstack.router.exchange import Exchange
from kvstack.router.policies.base import Decision, RequestFeatures
from kvstack.router.protocol import ParsedRequest

if TYPE_CHECKING:
    from kvstack.router.tracing import RequestTrace

Send = Any
Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True, eq=False)
class Call:
    """One proxied request on its way through the proxy: what the client sent, what became of it."""

    ex: Exchange  # its record: timings, status, engine; becomes the log line and metric labels
    request: ParsedRequest
    raw: bytes  # the body as the client sent it, forwarded unchanged
    send: Send
    client_headers: Headers
    client_host: str | None  # the peer's address, appended to X-Forwarded-For
    session_key: str | None
    features: RequestFeatures | None = None  # built once, when routing starts
    upstream_headers: Headers = field(default_factory=list)
    tried: list[str] = field(default_factory=list)  # engine URLs, in the order tried
    trace: RequestTrace | None = None  # its spans, when tracing is on (router/tracing.py)
    demand: Demand | None = None  # its passage through flow control (None: flow control is off)
    # the client connection's transport, under the router's own server (None elsewhere, e.g. tests
    # calling the ASGI app in process): the compiled relay writes to its socket
    transport: asyncio.Transport | None = None


@dataclass(slots=True, eq=False)
class Attempt:
    """One try of a call on one engine; :meth:`abort` ends it when the engine is declared down."""

    decision: Decision
    cutoff: asyncio.Timeout
    lost: bool = False
    answered: bool = False  # the whole answer went to the client (what is left is closing up)

    def abort(self) -> None:
        if not self.lost:
            self.lost = True
            self.cutoff.reschedule(0.0)  # in the past: the try is cancelled at its next await
