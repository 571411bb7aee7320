"""GETs to engines for the router's control loops: ``/health`` probes, ``/metrics`` scrapes, ``/v1/models``.

:class:`EngineFetch` is the one small interface the engine monitor talks through: a GET with a
timeout that returns the body of a 2xx answer, as bytes, text or JSON; everything else (no
connection, the timeout, a non-2xx status, a body too large or not JSON) is one
:class:`FetchError`. It runs on aiohttp, the client of the router's upstream
(:mod:`kvstack.router.upstream`). Through httpx, the monitor's GETs were a fixed cost that low
request rates do not amortise (issue #20): on this project's 2-core machine, against a simulator,
httpx took 0.96 ms of CPU per ``/health`` probe and 1.86 ms per 43 KB ``/metrics`` scrape, aiohttp
0.17 and 0.56 ms; an idle router in front of two engines went from 9 to 4.5 ms of CPU per second
(``bench-results/gpu/sim-matrix/README.md``, "The engine monitor on aiohttp").

The session and its connection pool are its own, not the upstream's: proxied streams hold their
connection for a whole generation and can fill the upstream's pool; a probe waiting for one of
those would time out and eject a healthy engine. The pool has no size limit: the monitor itself
bounds its concurrency (one probe loop and one scrape loop per engine, plus the occasional model
list), so a request here never waits for a connection, only for the engine.

The time limit covers the whole exchange (connecting, the headers, the body), as one
``asyncio.timeout``; aiohttp's own timers are off, so a GET arms one timer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import aiohttp

# Engines (vLLM's uvicorn) close a keep-alive connection after 5 s idle: give it up before they do,
# so a GET never goes out on a connection the engine is closing.
KEEPALIVE_S = 4.0
MAX_BODY_BYTES = 16 * 1024 * 1024  # a vLLM scrape is ~50 KB; a model list a few KB


class FetchError(Exception):
    """A GET that gave no usable answer. ``status``: the engine's non-2xx status, if it answered;
    ``timed_out``: none came within the GET's time."""

    def __init__(self, message: str, *, status: int | None = None, timed_out: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.timed_out = timed_out  # connected (or trying to), but no whole answer in time


class EngineFetch:
    """GETs with a time limit to any engine, on a pool of its own.

    Create inside the event loop; :meth:`aclose` it.
    """

    def __init__(self, *, max_body_bytes: int = MAX_BODY_BYTES, keepalive_s: float = KEEPALIVE_S) -> None:
        self.max_body_bytes = max_body_bytes
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=keepalive_s),
            timeout=aiohttp.ClientTimeout(total=None),  # one asyncio.timeout per GET instead
            trust_env=False,
            # the few bytes of a compressed scrape are not worth the CPU to inflate them
            skip_auto_headers=("Accept-Encoding",),
        )

    async def get(self, url: str, *, within: float, headers: Mapping[str, str] | None = None) -> bytes:
        """The body of a 2xx answer to ``GET url`` within ``within`` seconds; FetchError otherwise."""
        try:
            async with asyncio.timeout(within):
                async with self._session.get(url, headers=headers, allow_redirects=False) as resp:
                    body = await self._read(resp)
        except TimeoutError:
            raise FetchError(f"GET {url}: no answer within {within:g} s", timed_out=True) from None
        except (aiohttp.ClientError, OSError) as err:
            raise FetchError(f"GET {url}: {str(err) or type(err).__name__}") from err
        if not 200 <= resp.status < 300:
            raise FetchError(f"GET {url}: HTTP {resp.status}", status=resp.status)
        return body

    async def get_text(self, url: str, *, within: float, headers: Mapping[str, str] | None = None) -> str:
        """:meth:`get`, decoded as UTF-8 (bytes that are not become U+FFFD, as a text parser would see)."""
        return (await self.get(url, within=within, headers=headers)).decode("utf-8", "replace")

    async def get_json(self, url: str, *, within: float, headers: Mapping[str, str] | None = None) -> Any:
        """:meth:`get`, parsed as JSON; FetchError when the body is not JSON."""
        body = await self.get(url, within=within, headers=headers)
        try:
            return json.loads(body)
        except ValueError as err:  # UnicodeDecodeError included
            raise FetchError(f"GET {url}: the answer is not JSON ({err})") from err

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        length = resp.content_length
        if length is not None and length > self.max_body_bytes:
            raise FetchError(f"GET {resp.url}: {length} bytes is over {self.max_body_bytes}")
        parts: list[bytes] = []
        size = 0
        while chunk := await resp.content.readany():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise FetchError(f"GET {resp.url}: the answer is over {self.max_body_bytes} bytes")
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def aclose(self) -> None:
        await self._session.close()
