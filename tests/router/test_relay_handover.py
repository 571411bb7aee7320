"""When a stream may go to the native thread: ``relay.writable_fd`` on real connections, on both
event loops the router runs on (asyncio's and uvloop's)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import cast

import pytest
import uvloop

from kvstack.router.relay import writable_fd

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


async def served_transport() -> tuple[asyncio.Transport, asyncio.Server, socket.socket]:
    """The server's end of a real TCP connection, as the router's server holds it, and the client's
    socket, which reads nothing: our writes pile up once the kernel's buffers are full."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[asyncio.Transport] = loop.create_future()

    class Served(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvloop's transports are no asyncio.Transport subclasses, but speak the same methods
            accepted.set_result(cast(asyncio.Transport, transport))

    server = await loop.create_server(Served, "127.0.0.1", 0)
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, server.sockets[0].getsockname())
    return await accepted, server, client


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_writable_fd_only_for_an_open_connection_with_nothing_buffered(loop_name: str) -> None:
    async def check() -> None:
        assert writable_fd(None) is None  # not the router's own server
        open_one, server, client = await served_transport()
        fd = writable_fd(open_one)
        assert fd is not None and fd == open_one.get_extra_info("socket").fileno() and fd >= 0
        # bytes the transport still holds: the thread's writes would overtake them
        while open_one.get_write_buffer_size() == 0:
            open_one.write(b"x" * (1 << 20))
            await asyncio.sleep(0)
        assert writable_fd(open_one) is None
        # the client gone: the connection closed under the relay (it used to hand over -1)
        closed, other, other_client = await served_transport()
        closed.abort()
        assert writable_fd(closed) is None
        await asyncio.sleep(0.05)  # the loop has closed its socket by now
        assert writable_fd(closed) is None
        open_one.abort()
        for sock in (client, other_client):
            sock.close()
        server.close()
        other.close()

    loop = LOOPS[loop_name]()
    try:
        loop.run_until_complete(asyncio.wait_for(check(), 30))
    finally:
        loop.close()
