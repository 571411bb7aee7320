"""A real ZMQ KV-event source (PUB + ROUTER replay, vLLM 0.24's wire format) that tests can steer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
import zmq
import zmq.asyncio

from kvstack.common.kv_events import REPLAY_END, EventBatch, KVEvent, decode_seq, encode_batch, encode_seq
from kvstack.common.waits import wait_until_async


class EventSource:
    """Publishes batches like a vLLM engine; ``deliver=False`` loses one live (replay still has it)."""

    def __init__(self, ctx: zmq.asyncio.Context) -> None:
        self._ctx = ctx
        self.endpoint = "tcp://127.0.0.1:*"  # ZMQ picks free ports; a restart rebinds the same ones
        self.replay_endpoint = "tcp://127.0.0.1:*"
        self.seq = 0
        self.buffer: list[tuple[int, bytes]] = []
        self.replay_limit: int | None = None  # batches sent per replay ask, the rest dropped
        self.replay_hole: range | None = None  # sequence numbers the next replay ask drops
        self._pub: zmq.asyncio.Socket | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._server: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._pub = self._ctx.socket(zmq.PUB)
        self._router = self._ctx.socket(zmq.ROUTER)
        for sock in (self._pub, self._router):
            sock.setsockopt(zmq.LINGER, 0)
        await _bind(self._pub, self.endpoint)
        await _bind(self._router, self.replay_endpoint)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._server = asyncio.get_running_loop().create_task(self._serve_replays(self._router))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._server
            self._server = None
        for sock in (self._pub, self._router):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._router = None

    async def restart(self) -> None:
        """A new engine process on the same endpoints: sequence numbers and buffer start over."""
        await self.stop()
        self.seq, self.buffer = 0, []
        await self.start()

    async def publish(self, events: Sequence[KVEvent], *, deliver: bool = True) -> int:
        seq, payload = self.seq, encode_batch(EventBatch(ts=time.time(), events=list(events)))
        self.buffer.append((seq, payload))
        self.seq += 1
        if deliver:
            await self.send_raw([b"kv-events", encode_seq(seq), payload])
        return seq

    async def send_raw(self, frames: list[bytes]) -> None:
        assert self._pub is not None
        await self._pub.send_multipart(frames)

    async def _serve_replays(self, router: zmq.asyncio.Socket) -> None:
        while True:
            ident, _, start = await router.recv_multipart()
            first = decode_seq(start)
            wanted = [(seq, payload) for seq, payload in self.buffer if seq >= first]
            hole, self.replay_hole = self.replay_hole, None  # the next ask only
            if hole is not None:  # a stretch "dropped" mid-stream, the rest delivered
                wanted = [(seq, payload) for seq, payload in wanted if seq not in hole]
            limit = len(wanted) if self.replay_limit is None else self.replay_limit
            for seq, payload in wanted[:limit]:
                await router.send_multipart([ident, b"", encode_seq(seq), payload])
            if limit >= len(wanted):  # else the tail and the end marker are "dropped", as a full
                await router.send_multipart([ident, b"", REPLAY_END, b""])  # ROUTER pipe drops them


async def _bind(sock: zmq.asyncio.Socket, endpoint: str) -> None:
    # ZMQ releases a closed socket's port in its I/O thread, a moment after close() returns.
    for _ in range(200):
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as err:
            if err.errno != zmq.EADDRINUSE:
                raise
            await asyncio.sleep(0.02)
    sock.bind(endpoint)


@pytest.fixture
async def zmq_ctx() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


@pytest.fixture
async def event_source(zmq_ctx: zmq.asyncio.Context) -> AsyncIterator[Callable[[], Awaitable[EventSource]]]:
    sources: list[EventSource] = []

    async def make() -> EventSource:
        src = EventSource(zmq_ctx)
        await src.start()
        sources.append(src)
        return src

    try:
        yield make
    finally:
        for src in sources:
            await src.stop()


Until = Callable[[Callable[[], bool]], Awaitable[None]]


@pytest.fixture
def until() -> Until:
    """Wait for a condition; fails the test (a bound, not a speed claim) if it never holds."""

    async def wait(pred: Callable[[], bool]) -> None:
        await wait_until_async(pred, "the condition", timeout=10.0, interval=0.01)

    return wait
