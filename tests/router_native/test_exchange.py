"""The compiled relay read from Python (router/native_relay.py): bodies decoded as the engine framed
them, keep-alive reuse, a stale pooled connection retried once, and every failure as the
UpstreamError kind upstream.py uses, with the engine's address only in the detail.

Real servers throughout: aiohttp's web server streaming SSE as vLLM does, and a scripted TCP engine
(harness.py) for what a well-behaved server never does."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from kvstack.common.procs import free_port
from kvstack.router.native_relay import NativeResponse, open_native
from kvstack.router.upstream import Timeouts, UpstreamError

from .harness import FRAME, SSE_HEAD, TIMEOUTS, Conn, engine, needs_native

pytestmark = needs_native
JSON = [(b"content-type", b"application/json")]


async def post(url: str, *, timeouts: Timeouts = TIMEOUTS, max_bytes: int = 1 << 20) -> NativeResponse:
    return await open_native("POST", url, JSON, b'{"stream": true}', timeouts=timeouts, max_bytes=max_bytes)


async def read(url: str, **kw: object) -> tuple[int, bytes]:
    resp = await post(url, **kw)  # type: ignore[arg-type]
    try:
        return resp.status, await resp.read()
    finally:
        await resp.aclose()


@pytest.fixture
async def aiohttp_engine() -> object:
    """aiohttp's server: /stream answers SSE in one chunk per event, /json a Content-Length body."""
    frames = [b'data: {"i": %d}\n\n' % i for i in range(50)] + [b"data: [DONE]\n\n"]

    async def stream(request: web.Request) -> web.StreamResponse:
        assert json.loads(await request.read()) == {"stream": True}
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for frame in frames:
            await resp.write(frame)
            await asyncio.sleep(0)  # one chunk per event, as the engine produces them
        await resp.write_eof()
        return resp

    async def as_json(request: web.Request) -> web.Response:
        return web.json_response({"id": "x", "choices": [{"text": "y" * 5000}]})

    app = web.Application()
    app.router.add_post("/stream", stream)
    app.router.add_post("/json", as_json)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", b"".join(frames)
    await runner.cleanup()


async def test_a_streamed_answer_comes_out_decoded(aiohttp_engine: tuple[str, bytes]) -> None:
    base, body = aiohttp_engine
    resp = await post(base + "/stream")
    try:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        assert (b"transfer-encoding", b"chunked") in [(k.lower(), v) for k, v in resp.headers]
        assert b"".join([c async for c in resp.chunks()]) == body  # the chunk framing is gone
    finally:
        await resp.aclose()


async def test_a_content_length_body_is_read_whole(aiohttp_engine: tuple[str, bytes]) -> None:
    base, _ = aiohttp_engine
    status, body = await read(base + "/json")
    assert status == 200 and json.loads(body)["choices"][0]["text"] == "y" * 5000


async def test_a_body_that_ends_with_the_connection_is_read_whole_and_never_pooled() -> None:
    async def until_close(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\n" + b"z" * 70000)

    async with engine(until_close) as eng:
        assert await read(eng.url) == (200, b"z" * 70000)
        assert await read(eng.url) == (200, b"z" * 70000)
        assert len(eng.conns) == 2


async def keep_alive(conn: Conn) -> None:
    """Answers every request on the connection, alternating Content-Length and chunked bodies."""
    n = 0
    while await conn.request() is not None:
        if n % 2 == 0:
            await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
        else:
            await conn.send(SSE_HEAD)
            await conn.chunk(FRAME)
            await conn.send(b"0\r\n\r\n")
        n += 1


async def test_sequential_exchanges_reuse_one_keep_alive_connection() -> None:
    async with engine(keep_alive) as eng:
        assert await read(eng.url) == (200, b"hello")
        assert await read(eng.url) == (200, FRAME)
        assert await read(eng.url) == (200, b"hello")
        assert len(eng.conns) == 1


async def test_connection_close_is_honoured() -> None:
    async def closing(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
        await conn.wait_hang_up()  # the router closes it, as it said it would

    async with engine(closing) as eng:
        assert await read(eng.url) == (200, b"ok")
        assert await read(eng.url) == (200, b"ok")
        assert len(eng.conns) == 2


async def test_a_pooled_connection_found_dead_is_retried_once_on_a_new_one() -> None:
    dropped: list[bytes | None] = []

    async def once_then_drop(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst")
        if conn.number == 0:
            # the engine takes the next request, then closes without answering (its idle close
            # racing the router's reuse)
            dropped.append(await conn.request())
            return
        while await conn.request() is not None:
            await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nagain")

    async with engine(once_then_drop) as eng:
        assert await read(eng.url) == (200, b"first")
        assert await read(eng.url) == (200, b"first")  # answered on the second connection
        assert len(eng.conns) == 2
        assert dropped and dropped[0] is not None and dropped[0].startswith(b"POST ")  # sent on the stale one


async def test_a_stream_broken_off_midway_is_a_read_error() -> None:
    async def breaks(conn: Conn) -> None:
        await conn.request()
        await conn.send(SSE_HEAD)
        await conn.chunk(FRAME)
        await conn.send(b"40\r\npartial")  # half a chunk, then the connection closes

    async with engine(breaks) as eng:
        resp = await post(eng.url)
        got = []
        with pytest.raises(UpstreamError) as caught:
            async for chunk in resp.chunks():
                got.append(chunk)
        await resp.aclose()
    assert caught.value.kind == "read" and "127.0.0.1" not in str(caught.value)
    assert "127.0.0.1" in caught.value.detail
    assert b"".join(got).startswith(FRAME)


async def test_an_engine_silent_past_the_idle_timeout_is_a_timeout() -> None:
    async def stalls(conn: Conn) -> None:
        await conn.request()
        await conn.send(SSE_HEAD)
        await conn.chunk(FRAME)
        await conn.wait_hang_up()  # sends nothing more; returns when the router gives up

    async with engine(stalls) as eng:
        resp = await post(eng.url, timeouts=Timeouts(connect=5.0, first_byte=10.0, idle=0.3))
        with pytest.raises(UpstreamError) as caught:
            await resp.read()
        await resp.aclose()
        assert caught.value.kind == "timeout"
        await asyncio.wait_for(eng.conns[0].hung_up.wait(), 10)  # the stalled connection is dropped


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_over_max_bytes_is_too_large(chunked: bool) -> None:
    body = b"x" * 10000

    async def big(conn: Conn) -> None:
        await conn.request()
        if chunked:
            await conn.send(SSE_HEAD)
            for _ in range(10):
                await conn.chunk(body[:1000])
            await conn.send(b"0\r\n\r\n")
        else:
            await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10000\r\n\r\n" + body)
        await conn.wait_hang_up()

    async with engine(big) as eng:
        resp = await post(eng.url, max_bytes=4096)
        with pytest.raises(UpstreamError) as caught:
            async for _ in resp.chunks():  # not read(): its own limit would stop first
                pass
        await resp.aclose()
        assert caught.value.kind == "too_large" and "4096" in str(caught.value)
        await asyncio.wait_for(eng.conns[0].hung_up.wait(), 10)


async def test_an_unreachable_engine_is_a_connect_error_that_names_no_address() -> None:
    with pytest.raises(UpstreamError) as caught:
        await post(f"http://127.0.0.1:{free_port()}/v1/completions")
    assert caught.value.kind == "connect"
    assert "127.0.0.1" not in str(caught.value) and "127.0.0.1" in caught.value.detail


async def test_no_head_within_the_first_byte_timeout_is_a_timeout_and_the_request_dropped() -> None:
    async def silent(conn: Conn) -> None:
        await conn.request()
        await conn.wait_hang_up()

    async with engine(silent) as eng:
        with pytest.raises(UpstreamError) as caught:
            await post(eng.url, timeouts=Timeouts(connect=5.0, first_byte=0.3, idle=10.0))
        assert caught.value.kind == "timeout"
        await asyncio.wait_for(eng.conns[0].hung_up.wait(), 10)


async def test_only_plain_http_urls_are_taken() -> None:
    with pytest.raises(ValueError, match="http://"):
        await post("https://127.0.0.1:1/v1/completions")


async def test_a_body_python_does_not_poll_pushes_back_on_the_engine() -> None:
    total, sent = 32 << 20, [0]

    async def flood(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        piece = bytes(range(256)) * 256
        while sent[0] < total:
            await conn.send(piece)
            sent[0] += len(piece)

    async with engine(flood) as eng:
        resp = await post(eng.url, max_bytes=total)
        # nothing polled: the thread stops reading past its queue limit, the socket buffers fill,
        # and the engine's writes wait (the count stops moving well short of the whole body)
        last, still = -1, 0
        while still < 20:
            await asyncio.sleep(0.02)
            last, still = sent[0], still + 1 if sent[0] == last else 0
        assert last < total
        assert await resp.read() == bytes(range(256)) * (total // 256)
        await resp.aclose()


async def test_interim_responses_split_heads_chunk_extensions_and_trailers_are_parsed() -> None:
    async def fussy(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.send(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-ty")
            await asyncio.sleep(0.01)  # the head arrives in pieces
            await conn.send(b"pe: text/event-stream\r\ntransfer-encoding: gzip, chunked\r\n\r")
            await asyncio.sleep(0.01)
            await conn.send(b"\n5;ext=1\r\nhello\r\n")
            await asyncio.sleep(0.01)
            await conn.send(b"6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n")

    async with engine(fussy) as eng:
        resp = await post(eng.url)
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        assert await resp.read() == b"hello world"
        await resp.aclose()
        assert await read(eng.url) == (200, b"hello world")  # the trailers were consumed: reusable
        assert len(eng.conns) == 1


async def test_a_head_over_64_kib_is_too_large() -> None:
    async def huge_head(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\n" + b"x-pad: " + b"p" * 70000 + b"\r\n\r\n")
        await conn.wait_hang_up()

    async with engine(huge_head) as eng:
        with pytest.raises(UpstreamError) as caught:
            await post(eng.url)
        assert caught.value.kind == "too_large"
        await asyncio.wait_for(eng.conns[0].hung_up.wait(), 10)
