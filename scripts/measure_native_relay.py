"""Router CPU per streamed SSE event: aiohttp readany + ASGI send through uvicorn (the router's path),
aiohttp readany + a plain transport write, and the compiled relay's forward, over loopback.

    .venv/bin/python scripts/measure_native_relay.py [--streams 8] [--events 2000] [--lockstep]

A helper process plays the engines (one write per event, paced like decoding tokens) and the
clients; this process is the router, and only its CPU (all its threads: getrusage) is counted, from
the first client's arrival to the last stream's end. A measurement, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import socket
import subprocess
import sys
import time
from typing import Any

import aiohttp
import uvicorn
import uvloop

from kvstack.router.native_relay import available, open_native
from kvstack.router.upstream import Timeouts

EVENT = b'data: {"id":"cmpl-1","choices":[{"index":0,"delta":{"content":" token"}}]}\n\n'
# uvicorn: aiohttp readany + ASGI send + uvicorn (the router's relay, less its own framing);
# aiohttp: readany + a plain transport write; native: the first event through Python, then forward
MODES = ["uvicorn", "aiohttp", "native"]
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def helper(
    engine_port: int, router_port: int, streams: int, events: int, gap: float, lockstep: bool
) -> None:
    # lockstep: every stream gets its next token at one tick, as a vLLM decode step feeds its batch
    step = {"tick": asyncio.Event()}

    async def ticker() -> None:
        while True:
            await asyncio.sleep(gap)
            step["tick"].set()
            step["tick"] = asyncio.Event()

    async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                break  # the router closed its idle keep-alive connection, or the helper is exiting
            length = next(
                (int(h[15:]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")), 0
            )
            await reader.readexactly(length)
            writer.write(SSE_HEAD)
            for _ in range(events):
                writer.write(b"%x\r\n%s\r\n" % (len(EVENT), EVENT))  # one write per token, as vLLM does
                await writer.drain()
                await (step["tick"].wait() if lockstep else asyncio.sleep(gap))
            writer.write(b"0\r\n\r\n")
        writer.close()

    async def client() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", router_port)
        writer.write(b"GET / HTTP/1.1\r\nhost: router\r\n\r\n")
        got, tail = 0, b""
        while not tail.endswith(b"\r\n0\r\n\r\n"):  # the body's last chunk (uvicorn keeps the connection)
            data = await reader.read(1 << 16)
            if not data:
                break
            got += len(data)
            tail = (tail + data)[-16:]
        writer.close()
        return got

    server = await asyncio.start_server(engine, "127.0.0.1", engine_port)
    ticking = asyncio.create_task(ticker()) if lockstep else None
    async with server:
        print("ready", flush=True)
        await asyncio.sleep(0.5)
        sizes = await asyncio.gather(*(client() for _ in range(streams)))
        print("received", sum(sizes), flush=True)
    if ticking is not None:
        ticking.cancel()


async def router(mode: str, engine_port: int, router_port: int, streams: int) -> tuple[float, float, float]:
    url = f"http://127.0.0.1:{engine_port}/v1/chat/completions"
    body = b'{"stream": true}'
    headers = [(b"content-type", b"application/json")]
    done = asyncio.Event()
    state: dict[str, Any] = {"left": streams, "cpu0": None}
    session = aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=("Accept-Encoding",))
    timeouts = Timeouts(connect=5.0, first_byte=30.0, idle=30.0)

    def cpu() -> tuple[float, float]:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime, r.ru_stime

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if state["cpu0"] is None:
            state["cpu0"], state["wall0"] = cpu(), time.monotonic()
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        transport = writer.transport
        if mode == "aiohttp":
            resp = await session.post(url, data=body, headers={"content-type": "application/json"})
            while chunk := await resp.content.readany():
                transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                if transport.get_write_buffer_size() > 65536:
                    await writer.drain()
            resp.release()
        else:
            native = await open_native("POST", url, headers, body, timeouts=timeouts, max_bytes=1 << 30)
            first = await anext(aiter(native.chunks()))  # the first token goes out through Python
            transport.write(b"%x\r\n%s\r\n" % (len(first), first))
            transport.set_write_buffer_limits(high=0)  # drain() now returns only once all is sent:
            await writer.drain()  # the thread's writes must not pass bytes still buffered here
            sock = transport.get_extra_info("socket")
            forwarded = await native.forward(sock.fileno(), chunked=True)
            assert forwarded.outcome == "end", forwarded
            await native.aclose()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()
        state["left"] -= 1
        if not state["left"]:
            state["cpu1"], state["wall1"] = cpu(), time.monotonic()
            done.set()

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        # the router's own path, less its routing: aiohttp readany, then ASGI send, uvicorn's write
        if state["cpu0"] is None:
            state["cpu0"], state["wall0"] = cpu(), time.monotonic()
        resp = await session.post(url, data=body, headers={"content-type": "application/json"})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        while chunk := await resp.content.readany():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        resp.release()
        state["left"] -= 1
        if not state["left"]:
            state["cpu1"], state["wall1"] = cpu(), time.monotonic()
            done.set()

    if mode == "uvicorn":
        config = uvicorn.Config(
            asgi,
            host="127.0.0.1",
            port=router_port,
            loop="none",
            http="httptools",
            lifespan="off",
            log_level="warning",
            access_log=False,
        )
        server_task = asyncio.ensure_future(uvicorn.Server(config).serve())
        await done.wait()
        server_task.cancel()
        with contextlib.suppress(BaseException):
            await server_task
    else:
        server = await asyncio.start_server(serve, "127.0.0.1", router_port)
        async with server:
            await done.wait()
    await session.close()
    (u0, s0), (u1, s1) = state["cpu0"], state["cpu1"]
    return u1 - u0, s1 - s0, state["wall1"] - state["wall0"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--gap", type=float, default=0.001, help="seconds between two events of a stream")
    parser.add_argument(
        "--lockstep", action="store_true", help="every stream's next event at one tick (a decode step)"
    )
    parser.add_argument("--mode", choices=MODES, action="append", help="default: all")
    parser.add_argument("--helper", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.helper:
        uvloop.run(helper(*args.helper, args.streams, args.events, args.gap, args.lockstep))
        return
    modes = args.mode or [m for m in MODES if m != "native" or available()]
    for mode in modes:
        engine_port, router_port = free_port(), free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--streams",
                str(args.streams),
                "--events",
                str(args.events),
                "--gap",
                str(args.gap),
                *(["--lockstep"] if args.lockstep else []),
                "--helper",
                str(engine_port),
                str(router_port),
            ],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        proc.stdout.readline()  # ready
        user, system, wall = uvloop.run(router(mode, engine_port, router_port, args.streams))
        received = proc.stdout.readline().decode().split()[-1]
        proc.wait()
        n = args.streams * args.events
        cpu = user + system
        print(
            f"{mode:8} {n} events in {wall:.1f} s: router CPU {cpu / n * 1e6:.1f} us/event "
            f"(user {user / n * 1e6:.1f}, system {system / n * 1e6:.1f}; client got {received} bytes)"
        )


if __name__ == "__main__":
    main()
