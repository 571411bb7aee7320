"""The aiohttp backend's idle timeout (router/upstream.py ``IdleWatch``): only time spent waiting for
the engine counts, each wait on its own; a stall ends the read with ``UpstreamError("timeout")``, and
a cancellation from elsewhere (a client that went away) stays a cancellation.

A real HTTP/1.1 server sends a chunked SSE answer with the gaps each test asks for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest

from kvstack.router.upstream import Timeouts, Upstream, UpstreamError

FRAME = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
FOREVER = None  # a gap that never ends: the engine stalls


@asynccontextmanager
async def engine(gaps: Sequence[float | None]) -> AsyncIterator[str]:
    """An engine answering every POST with one frame after each of ``gaps`` (seconds), then the end."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0
        )
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        try:
            for gap in gaps:
                if gap is FOREVER:
                    await asyncio.Event().wait()
                await asyncio.sleep(gap)
                writer.write(b"%x\r\n%s\r\n" % (len(FRAME), FRAME))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/v1/chat/completions"


async def read_all(url: str, idle: float, between: float = 0.0) -> list[bytes]:
    """Every chunk of the answer; ``between``: seconds the reader spends on each chunk (relaying it)."""
    upstream = Upstream(Timeouts(connect=5.0, first_byte=5.0, idle=idle))
    try:
        resp = await upstream.send("POST", url, [(b"content-type", b"application/json")], b"{}")
        try:
            chunks = []
            async for chunk in resp.chunks():
                chunks.append(chunk)
                if between:
                    await asyncio.sleep(between)
            return chunks
        finally:
            await resp.aclose()
    finally:
        await upstream.aclose()


async def test_a_trickle_slower_in_total_than_the_idle_timeout_is_read_whole() -> None:
    # 12 gaps of 0.1 s: 1.2 s in all, past the 0.5 s idle timeout, never 0.5 s without data
    async with engine([0.1] * 12) as url:
        assert b"".join(await read_all(url, idle=0.5)).count(b"data: ") == 12


async def test_a_reader_busy_relaying_is_not_idle() -> None:
    # the engine sends at once; the reader takes 0.4 s per frame, 1.2 s in all, idle timeout 0.3 s
    async with engine([0.0] * 3) as url:
        assert b"".join(await read_all(url, idle=0.3, between=0.4)).count(b"data: ") == 3


async def test_a_stalled_engine_ends_the_read_with_a_timeout() -> None:
    async with engine([0.0, FOREVER]) as url:
        got: list[bytes] = []

        async def read() -> None:
            upstream = Upstream(Timeouts(connect=5.0, first_byte=5.0, idle=0.3))
            resp = await upstream.send("POST", url, [], b"{}")
            try:
                async for chunk in resp.chunks():
                    got.append(chunk)
            finally:
                await resp.aclose()
                await upstream.aclose()

        task = asyncio.create_task(read())
        with pytest.raises(UpstreamError) as err:
            await task
    assert err.value.kind == "timeout" and "no data from the engine for 0.3 s" in str(err.value)
    assert b"".join(got).count(b"data: ") == 1  # what came before the stall was read
    assert task.cancelling() == 0  # the watch's own cancellation was undone


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    async with engine([0.0, FOREVER]) as url:
        first = asyncio.Event()

        async def read() -> None:
            upstream = Upstream(Timeouts(connect=5.0, first_byte=5.0, idle=60.0))
            resp = await upstream.send("POST", url, [], b"{}")
            try:
                async for _ in resp.chunks():
                    first.set()
            finally:
                await resp.aclose()
                await upstream.aclose()

        task = asyncio.create_task(read())
        await first.wait()
        task.cancel()  # the client went away while the read waits for the engine
        with pytest.raises(asyncio.CancelledError):
            await task
