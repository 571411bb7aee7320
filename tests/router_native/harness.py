"""A scriptable engine for the compiled relay's tests: a real asyncio TCP server speaking HTTP/1.1,
each connection driven by the test's own coroutine, so a test can answer, stall, break off, close,
and see whether the router hung up. Tests skip where the extension is not built."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvstack.router import native_relay
from kvstack.router.upstream import Timeouts

# skip, not fail: the pure-Python relay is the reference where no Rust toolchain built this one
# (test_built.py fails instead where KVSTACK_REQUIRE_NATIVE=1, as in make unit)
needs_native = pytest.mark.skipif(
    not native_relay.available(), reason="kvstack.router._relay is not built (router/native, needs Rust)"
)

TIMEOUTS = Timeouts(connect=5.0, first_byte=10.0, idle=10.0)
FRAME = b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'


@dataclass
class Conn:
    """One accepted connection: its number (0, 1, ...), and set once the router's side has hung up."""

    number: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)

    async def request(self) -> bytes | None:
        """The next request (head and Content-Length body), or None when the router closed."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return head + await self.reader.readexactly(length)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def chunk(self, data: bytes) -> None:
        await self.send(b"%x\r\n%s\r\n" % (len(data), data))

    async def wait_hang_up(self) -> None:
        """Returns once the router's side of the connection is closed (EOF or reset)."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.hung_up.set()


Handler = Callable[[Conn], Awaitable[None]]
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


@dataclass
class Engine:
    url: str
    conns: list[Conn] = field(default_factory=list)


@asynccontextmanager
async def engine(handler: Handler) -> AsyncIterator[Engine]:
    """A server on a free loopback port; ``handler`` runs for every connection, which closes after."""
    box: list[Engine] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(len(box[0].conns), reader, writer)
        box[0].conns.append(conn)
        try:
            await handler(conn)
        except ConnectionError:
            conn.hung_up.set()  # the router hung up while the engine was writing
        finally:
            writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    box.append(Engine(f"http://127.0.0.1:{port}/v1/chat/completions"))
    async with server:
        yield box[0]
        server.close()


def open_fds() -> set[Path]:
    return set(Path("/proc/self/fd").iterdir())


def threads_named(name: str) -> int:
    """Threads of this process with ``name`` (what the relay names its native threads)."""
    return sum(1 for task in Path("/proc/self/task").iterdir() if (task / "comm").read_text().strip() == name)


def relay_threads() -> int:
    """Exchange threads alive: each lives until its body ends or forwarding takes it over."""
    return threads_named("kvstack-relay")


async def settled(check: Callable[[], bool], tries: int = 500) -> bool:
    """Whether ``check`` holds within a bounded number of loop turns (the native thread ends on
    its own schedule): a bound on waiting, never a duration that is asserted."""
    for _ in range(tries):
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()
