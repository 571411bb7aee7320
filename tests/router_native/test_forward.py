"""forward(): the native thread writes the rest of the engine's body to the client socket itself.
Exact bytes (chunk framing on the client side, none from the engine), bytes Python had polled but
not relayed first, every way it ends (the engine's end or failure, a client gone or not reading, a
cancel), and no descriptor or thread left behind. Real TCP connections on both sides."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import Iterator

import pytest

from kvstack.router.native_relay import Forwarded, NativeResponse, clear_pool, forwarding_thread, open_native
from kvstack.router.upstream import Timeouts

from .harness import FRAME, SSE_HEAD, Conn, Handler, engine, needs_native, open_fds, relay_threads, settled

pytestmark = needs_native
FRAMES = [b'data: {"n": %d}\n\n' % i for i in range(200)]


@contextlib.contextmanager
def client_connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A real TCP connection: the server's end (non-blocking, as uvloop holds it) and the client's."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        served, _ = listener.accept()
    served.setblocking(False)
    client.setblocking(False)
    try:
        yield served, client
    finally:
        served.close()
        client.close()


async def receive_all(client: socket.socket) -> bytes:
    """Everything the client receives until the server's end closes."""
    loop = asyncio.get_running_loop()
    parts = []
    while data := await loop.sock_recv(client, 1 << 16):
        parts.append(data)
    return b"".join(parts)


def dechunk(data: bytes) -> list[bytes]:
    """The chunks of an HTTP/1.1 chunked body without its last, empty chunk (the server's to write)."""
    chunks = []
    while data:
        size_line, sep, data = data.partition(b"\r\n")
        assert sep and size_line, "a chunk size line"
        size = int(size_line, 16)
        assert size > 0, "forward never writes the terminating chunk"
        chunks.append(data[:size])
        assert data[size : size + 2] == b"\r\n"
        data = data[size + 2 :]
    return chunks


async def post(url: str, idle: float = 10.0, max_event: int = 0) -> NativeResponse:
    timeouts = Timeouts(connect=5.0, first_byte=10.0, idle=idle)
    return await open_native(
        "POST", url, [], b"{}", timeouts=timeouts, max_bytes=64 << 20, max_event=max_event
    )


async def forward_and_receive(resp: NativeResponse, *, chunked: bool) -> tuple[Forwarded, bytes]:
    with client_connection() as (served, client):
        receiving = asyncio.ensure_future(receive_all(client))
        done = await resp.forward(served.fileno(), chunked=chunked)
        served.shutdown(socket.SHUT_WR)  # what the server does after its own last bytes
        return done, await receiving


async def test_the_rest_of_a_stream_is_relayed_as_chunks_and_the_connection_kept() -> None:
    go = asyncio.Event()

    async def stream(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.send(SSE_HEAD)
            await conn.chunk(FRAMES[0])
            await go.wait()
            for frame in FRAMES[1:]:
                await conn.chunk(frame)
            await conn.send(b"0\r\n\r\n")

    async with engine(stream) as eng:
        resp = await post(eng.url)
        first = await anext(aiter(resp.chunks()))
        go.set()
        done, received = await forward_and_receive(resp, chunked=True)
        await resp.aclose()
        assert first == FRAMES[0]
        assert done == Forwarded(sum(map(len, FRAMES[1:])), "end")
        assert b"".join(dechunk(received)) == b"".join(FRAMES[1:])
        # a clean end on a keep-alive connection: the next exchange reuses it
        resp = await post(eng.url)
        assert await resp.read() == b"".join(FRAMES)
        await resp.aclose()
        assert len(eng.conns) == 1


async def test_a_large_content_length_body_is_relayed_unframed_byte_for_byte() -> None:
    body = bytes(range(256)) * 8192  # 2 MiB: many writes, the client socket fills and drains

    async def whole(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)

    async with engine(whole) as eng:
        resp = await post(eng.url)
        done, received = await forward_and_receive(resp, chunked=False)
        await resp.aclose()
    assert done == Forwarded(len(body), "end") and received == body


async def test_bytes_python_polled_but_did_not_relay_go_first_even_after_the_engine_ended() -> None:
    async def trickle(conn: Conn) -> None:
        await conn.request()
        await conn.send(SSE_HEAD)
        for frame in FRAMES[:20]:
            await conn.chunk(frame)
            await asyncio.sleep(0.001)  # separate reads, so separate events, most likely
        await conn.send(b"0\r\n\r\n")
        await conn.wait_hang_up()

    async with engine(trickle) as eng:
        resp = await post(eng.url)
        first = await anext(aiter(resp.chunks()))
        feed = resp._feed  # white box: hold the whole answer, its end included, as polled events

        def polled_the_end() -> bool:
            feed.pending.extend(feed.ex.poll())
            return any(event[0] == "end" for event in feed.pending)

        assert await settled(polled_the_end)
        done, received = await forward_and_receive(resp, chunked=True)
        await resp.aclose()
    assert done.outcome == "end"
    assert first + b"".join(dechunk(received)) == b"".join(FRAMES[:20])


def streaming_until_hang_up() -> Handler:
    async def handler(conn: Conn) -> None:
        await conn.request()
        watch = asyncio.ensure_future(conn.wait_hang_up())
        await conn.send(SSE_HEAD)
        await conn.chunk(FRAME)
        while not conn.hung_up.is_set():
            await asyncio.sleep(0.01)
            await conn.chunk(FRAME)
        await watch

    return handler


async def test_a_client_gone_mid_forward_ends_it_and_drops_the_engine_connection() -> None:
    async with engine(streaming_until_hang_up()) as eng:
        resp = await post(eng.url)
        await anext(aiter(resp.chunks()))
        with client_connection() as (served, client):
            forwarding = asyncio.ensure_future(resp.forward(served.fileno(), chunked=True))
            assert await asyncio.get_running_loop().sock_recv(client, 100)  # the relay is running
            client.close()
            done = await forwarding
        await resp.aclose()
        assert done.outcome == "client_gone" and done.nbytes > 0
        await asyncio.wait_for(eng.conns[0].hung_up.wait(), 10)  # the engine sees the disconnect


async def test_a_client_that_stops_reading_is_stalled_after_the_idle_timeout() -> None:
    async def flood(conn: Conn) -> None:
        await conn.request()
        await conn.send(SSE_HEAD)
        while True:
            await conn.chunk(b"x" * 65536)

    async with engine(flood) as eng:
        resp = await post(eng.url, idle=0.5)
        with client_connection() as (served, _client):  # the client never reads
            done = await resp.forward(served.fileno(), chunked=True)
        await resp.aclose()
        assert done.outcome == "client_stalled" and done.nbytes > 0
        await asyncio.wait_for(eng.conns[0].hung_up.wait(), 10)


@pytest.mark.parametrize(("idle", "frames", "outcome"), [(10.0, 3, "read"), (0.3, None, "timeout")])
async def test_the_engine_failing_mid_forward_is_its_outcome(
    idle: float, frames: int | None, outcome: str
) -> None:
    async def fails(conn: Conn) -> None:
        await conn.request()
        await conn.send(SSE_HEAD)
        await conn.chunk(FRAME)
        if frames is None:
            await conn.wait_hang_up()  # stalls
            return
        for _ in range(frames):
            await conn.chunk(FRAME)
        await conn.send(b"100\r\ncut")

    async with engine(fails) as eng:
        resp = await post(eng.url, idle=idle)
        first = await anext(aiter(resp.chunks()))
        done, received = await forward_and_receive(resp, chunked=True)
        await resp.aclose()
    assert done.outcome == outcome
    rest = b"".join(dechunk(received))
    # what came is relayed as it came, a broken chunk's start included
    assert first + rest == (FRAME * (frames + 1) + b"cut" if frames else FRAME)
    assert done.nbytes == len(rest)


async def test_cancel_ends_a_forward_and_the_engine_connection() -> None:
    async with engine(streaming_until_hang_up()) as eng:
        resp = await post(eng.url)
        with client_connection() as (served, client):
            forwarding = asyncio.ensure_future(resp.forward(served.fileno(), chunked=True))
            assert await asyncio.get_running_loop().sock_recv(client, 100)
            resp.cancel()
            resp.cancel()  # idempotent
            done = await forwarding
        await resp.aclose()
        assert done.outcome == "cancelled"
        await asyncio.wait_for(eng.conns[0].hung_up.wait(), 10)


async def test_a_cancelled_forward_task_waits_for_the_thread_then_raises() -> None:
    async with engine(streaming_until_hang_up()) as eng:
        resp = await post(eng.url)
        with client_connection() as (served, client):
            forwarding = asyncio.ensure_future(resp.forward(served.fileno(), chunked=True))
            assert await asyncio.get_running_loop().sock_recv(client, 100)
            forwarding.cancel()
            with pytest.raises(asyncio.CancelledError):
                await forwarding
            assert await settled(lambda: relay_threads() == 0)  # nothing writes to the socket now
        await resp.aclose()
        await asyncio.wait_for(eng.conns[0].hung_up.wait(), 10)


async def test_a_forward_cancelled_before_the_thread_takes_it_still_ends() -> None:
    """The client hanging up as the first token goes out: the disconnect watcher's cancel can reach
    the thread together with the forward it was asked for, before it took the socket. The thread's
    last word must still be "forwarded" (here "cancelled"), or the request waits for it forever: it
    did, and a client that hung up right after its first chunk was neither counted nor let go.
    forward() and cancel() go to the exchange back to back, as fast as Python can (what the thread
    finds then depends on when it wakes, so it is tried many times)."""
    async with engine(streaming_until_hang_up()) as eng:
        for _ in range(50):
            resp = await post(eng.url)
            with client_connection() as (served, _client):
                feed = resp._feed  # the exchange itself: the two calls must not be a loop turn apart
                feed.ex.forward(served.fileno(), True, [])
                feed.ex.cancel()
                while (event := await asyncio.wait_for(feed.next(), 10))[0] != "forwarded":
                    pass  # data or the head polled before the forward: not this test's business
                assert event[2] == "cancelled"
            await resp.aclose()
        assert await settled(lambda: relay_threads() == 0)


async def test_no_descriptor_or_thread_outlives_its_exchanges() -> None:
    forwarding_thread()  # its descriptors are the process's, whichever exchange starts it
    clear_pool()
    assert await settled(lambda: gc.collect() >= 0 and relay_threads() == 0)
    before = open_fds()

    async def varied(conn: Conn) -> None:
        while (request := await conn.request()) is not None:
            if b"/broken" in request:
                await conn.send(SSE_HEAD + b"5\r\nab")
                return
            await conn.send(SSE_HEAD)
            for frame in FRAMES[:5]:
                await conn.chunk(frame)
            await conn.send(b"0\r\n\r\n")

    async with engine(varied) as eng:
        for _ in range(3):
            resp = await post(eng.url)
            assert await resp.read() == b"".join(FRAMES[:5])
            await resp.aclose()
            resp = await post(eng.url)
            done, _ = await forward_and_receive(resp, chunked=True)
            assert done.outcome == "end"
            await resp.aclose()
            resp = await post(eng.url + "/broken")
            with contextlib.suppress(Exception):
                await resp.read()
            await resp.aclose()
            resp = await post(eng.url)  # opened, then closed unread
            await resp.aclose()
        del resp
    clear_pool()
    # an exchange closes its descriptors when it is dropped: collect what other tests left in cycles
    assert await settled(lambda: gc.collect() >= 0 and relay_threads() == 0)
    assert await settled(lambda: gc.collect() >= 0 and open_fds() == before), open_fds() ^ before


# With SSE framing (max_event, as the router runs it) the thread holds back the [DONE] that ends a
# body and reports it as the forward's tail, for the server to write with the stream's end.
DONE = b"data: [DONE]\n\n"


async def forward_framed(pieces: list[bytes], end: bytes = b"0\r\n\r\n") -> tuple[Forwarded, bytes]:
    """An engine's body written as ``pieces`` (a chunk each, most likely a read each), then ``end``,
    forwarded from its start with SSE framing: how it ended, and the body the client received."""

    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(SSE_HEAD)
        for piece in pieces:
            await conn.chunk(piece)
            await asyncio.sleep(0.002)
        await conn.send(end)

    async with engine(script) as eng:
        resp = await post(eng.url, max_event=1 << 20)
        done, received = await forward_and_receive(resp, chunked=True)
        await resp.aclose()
    return done, b"".join(dechunk(received))


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
async def test_the_done_event_that_ends_a_body_is_not_written_but_handed_back(eol: bytes) -> None:
    frames = [b'data: {"n": %d}%s%s' % (i, eol, eol) for i in range(5)]
    done_event = b"data: [DONE]" + eol + eol
    done, received = await forward_framed([*frames, done_event])
    assert received == b"".join(frames)
    assert done == Forwarded(len(received), "end", done_event)


async def test_a_done_event_split_across_the_engines_chunks_is_held_whole() -> None:
    done, received = await forward_framed([FRAMES[0], FRAMES[1] + b"data: [DO", b"NE]\n", b"\n"])
    assert received == FRAMES[0] + FRAMES[1]
    assert done == Forwarded(len(received), "end", DONE)


async def test_body_after_a_done_event_follows_it_in_order() -> None:
    late = b'data: {"late": true}\n\n'
    done, received = await forward_framed([FRAMES[0], DONE, late, FRAMES[1] + DONE + late, DONE])
    # a held [DONE] goes out before what follows it; only the one that ends the body is held
    assert received == FRAMES[0] + DONE + late + FRAMES[1] + DONE + late
    assert done == Forwarded(len(received), "end", DONE)


async def test_a_body_without_a_done_event_is_written_whole_with_no_tail() -> None:
    mention = b'data: {"content": "data: [DONE]\\n\\n"}\n\n'  # [DONE] inside an event's data
    done, received = await forward_framed([*FRAMES[:20], mention])
    assert received == b"".join(FRAMES[:20]) + mention
    assert done == Forwarded(len(received), "end", b"")


async def test_after_a_done_event_the_engines_failure_still_hands_it_back() -> None:
    """Written before the error event the server sends next, as the Python relay sends [DONE]."""
    done, received = await forward_framed([FRAMES[0], DONE], end=b"100\r\ncut")
    assert received == FRAMES[0]  # half an event is never passed on
    assert done == Forwarded(len(received), "read", DONE)


async def test_a_cancelled_forward_drops_a_held_done_event() -> None:
    async def stalls_after_done(conn: Conn) -> None:
        await conn.request()
        await conn.send(SSE_HEAD)
        await conn.chunk(FRAMES[0] + DONE)  # one read: held by the time FRAMES[0] is received
        await conn.wait_hang_up()

    async with engine(stalls_after_done) as eng:
        resp = await post(eng.url, max_event=1 << 20)
        with client_connection() as (served, client):
            forwarding = asyncio.ensure_future(resp.forward(served.fileno(), chunked=True))
            first = await asyncio.get_running_loop().sock_recv(client, 1 << 16)
            resp.cancel()
            done = await forwarding
        await resp.aclose()
    assert dechunk(first) == [FRAMES[0]]
    assert done == Forwarded(len(FRAMES[0]), "cancelled", b"")
