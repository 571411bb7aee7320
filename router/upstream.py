"""The one shared upstream HTTP client, behind a small interface so backends can be swapped.

Both backends speak httpx's API. ``aiohttp`` (the default) runs it over aiohttp's connection pool
through ``httpx_aiohttp.AiohttpTransport``, which measured 5x plain httpx's throughput under
concurrency on this machine (../shared/reference/http-clients.md); ``httpx`` is plain httpx.

Timeouts are enforced here rather than by the backend, so both behave the same: ``connect`` to
open a connection, ``first_byte`` until the response headers arrive, ``idle`` between two body
chunks. Errors come out as :class:`UpstreamError` with a kind the proxy decides on:
``connect`` (nothing was received: safe to retry elsewhere), ``timeout`` and ``read``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

import httpx

Backend = Literal["aiohttp", "httpx"]
ErrorKind = Literal["connect", "timeout", "read"]
Headers = Sequence[tuple[bytes, bytes]]


class UpstreamError(Exception):
    """The engine could not be reached, did not answer in time, or broke off its response."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    first_byte: float
    idle: float


class UpstreamResponse:
    """An open response: read it whole or chunk by chunk, and always :meth:`aclose` it."""

    __slots__ = ("_idle", "_resp", "content_type", "status")

    def __init__(self, resp: httpx.Response, idle: float) -> None:
        self._resp = resp
        self._idle = idle
        self.status: int = resp.status_code
        self.content_type: str | None = resp.headers.get("content-type")

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; ``UpstreamError`` on a broken or stalled body."""
        it = self._resp.aiter_raw().__aiter__()
        idle = self._idle
        while True:
            try:
                async with asyncio.timeout(idle):
                    chunk = await it.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise UpstreamError("timeout", f"no data from the engine for {idle:g} s") from None
            except httpx.HTTPError as err:
                raise UpstreamError(
                    "read", f"engine response broke off: {err or type(err).__name__}"
                ) from err
            if chunk:
                yield chunk

    async def read(self) -> bytes:
        """The whole body."""
        parts = [chunk async for chunk in self.chunks()]
        return b"".join(parts)

    async def aclose(self) -> None:
        """Release the connection; closing before the end drops it, which aborts the engine's request."""
        # closing a broken connection may raise; it is closed either way
        with contextlib.suppress(Exception):
            await self._resp.aclose()


def _transport(backend: Backend, limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    if backend == "aiohttp":
        from httpx_aiohttp import AiohttpTransport

        transport: httpx.AsyncBaseTransport = AiohttpTransport(limits=limits, trust_env=False)
        return transport
    return httpx.AsyncHTTPTransport(limits=limits, trust_env=False)


class Upstream:
    """The process-wide client for engine requests. Create inside the event loop; :meth:`aclose` it."""

    def __init__(
        self,
        timeouts: Timeouts,
        *,
        backend: Backend = "aiohttp",
        max_connections: int = 2048,
        keepalive_expiry: float = 4.0,
    ) -> None:
        self.backend = backend
        self.timeouts = timeouts
        # Streams hold a connection for their whole generation: size the pool for peak concurrency.
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=keepalive_expiry,
        )
        self._client = httpx.AsyncClient(
            transport=_transport(backend, limits),
            timeout=httpx.Timeout(connect=timeouts.connect, read=None, write=None, pool=None),
            trust_env=False,
            follow_redirects=False,
        )

    async def send(self, method: str, url: str, headers: Headers, body: bytes | None) -> UpstreamResponse:
        """Send a request and return once the response headers are in."""
        request = self._client.build_request(method, url, headers=list(headers), content=body)
        try:
            async with asyncio.timeout(self.timeouts.first_byte):
                resp = await self._client.send(request, stream=True)
        except TimeoutError:
            raise UpstreamError(
                "timeout", f"engine sent no response within {self.timeouts.first_byte:g} s"
            ) from None
        except httpx.TimeoutException as err:
            # the backend's connect timeout: nothing was sent, so this is a connect failure
            raise UpstreamError("connect", f"cannot connect to {url}: timed out") from err
        except httpx.HTTPError as err:
            raise UpstreamError("connect", f"cannot reach {url}: {err or type(err).__name__}") from err
        return UpstreamResponse(resp, self.timeouts.idle)

    async def aclose(self) -> None:
        await self._client.aclose()
