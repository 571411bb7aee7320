"""One forwarding thread per process: once forward() is taken up, an exchange's own thread hands the
body over and ends, and a single epoll thread writes every forwarded body. What that must keep: every
stream's bytes exact, and no client's pace holding up another's stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

from kvstack.router.native_relay import Forwarded, forwarding_thread

from .harness import SSE_HEAD, Conn, engine, needs_native, relay_threads, settled, threads_named
from .test_forward import FRAMES, client_connection, dechunk, post, receive_all

pytestmark = needs_native


async def test_forwarded_streams_share_one_thread_and_their_own_threads_end() -> None:
    go = asyncio.Event()

    async def paused(conn: Conn) -> None:
        await conn.request()
        await conn.send(SSE_HEAD)
        await conn.chunk(FRAMES[0])
        await go.wait()  # the rest only once every stream is being forwarded
        for frame in FRAMES[1:50]:
            await conn.chunk(frame)
        await conn.send(b"0\r\n\r\n")

    streams = 6
    async with engine(paused) as eng:
        resps = [await post(eng.url) for _ in range(streams)]
        for resp in resps:
            assert await anext(aiter(resp.chunks())) == FRAMES[0]
        with contextlib.ExitStack() as stack:
            pairs = [stack.enter_context(client_connection()) for _ in range(streams)]
            receiving = [asyncio.ensure_future(receive_all(client)) for _, client in pairs]
            forwarding = [
                asyncio.ensure_future(resp.forward(served.fileno(), chunked=True))
                for resp, (served, _) in zip(resps, pairs, strict=True)
            ]
            # every stream is mid-body (the engine holds the rest), and no exchange thread is left
            assert await settled(lambda: relay_threads() == 0)
            assert threads_named("kvstack-forward") == 1
            go.set()
            done = await asyncio.gather(*forwarding)
            for served, _ in pairs:
                served.shutdown(socket.SHUT_WR)
            received = await asyncio.gather(*receiving)
        for resp in resps:
            await resp.aclose()
    body = b"".join(FRAMES[1:50])
    assert done == [Forwarded(len(body), "end")] * streams
    assert [b"".join(dechunk(r)) for r in received] == [body] * streams


async def test_a_client_that_stops_reading_holds_up_no_other_stream() -> None:
    async def answer(conn: Conn) -> None:
        request = await conn.request()
        await conn.send(SSE_HEAD)
        if request is not None and b"/flood" in request:
            while True:  # until the router hangs up
                await conn.chunk(b"x" * 65536)
        for frame in FRAMES:
            await conn.chunk(frame)
            await asyncio.sleep(0.001)
        await conn.send(b"0\r\n\r\n")

    async with engine(answer) as eng:
        stalled = await post(eng.url + "/flood", idle=60.0)
        with client_connection() as (flood_served, _never_read):
            flooding = asyncio.ensure_future(stalled.forward(flood_served.fileno(), chunked=True))
            # the flood fills its client's socket while the forwarding thread holds its pieces
            await asyncio.sleep(0.2)
            moving = await post(eng.url)
            with client_connection() as (served, client):
                receiving = asyncio.ensure_future(receive_all(client))
                done = await moving.forward(served.fileno(), chunked=True)
                served.shutdown(socket.SHUT_WR)
                received = await receiving
            await moving.aclose()
            assert done == Forwarded(sum(map(len, FRAMES)), "end")
            assert b"".join(dechunk(received)) == b"".join(FRAMES)
            assert not flooding.done()  # still waiting on its own client, alone
            await stalled.aclose()  # cancels it
            assert (await flooding).outcome == "cancelled"


def test_without_the_forwarding_thread_each_exchange_forwards_its_own_body() -> None:
    """``KVSTACK_RELAY_FORWARDING_THREAD=0`` (and a process where the thread cannot start) keeps the
    body on the exchange's own thread: every forward test passes that way too, in a process of its own
    (the switch is read once per process)."""
    assert forwarding_thread()
    env = {**os.environ, "KVSTACK_RELAY_FORWARDING_THREAD": "0"}
    check = "from kvstack.router.native_relay import forwarding_thread; assert not forwarding_thread()"
    subprocess.run([sys.executable, "-c", check], env=env, check=True, timeout=60)
    here = Path(__file__).parent
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            str(here / "test_forward.py"),
        ],
        env=env,
        cwd=here.parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], run.stdout[-500:]
