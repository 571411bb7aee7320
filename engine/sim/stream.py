"""One request inside the simulated core: its state, its output stream, its final stats.

The stream is what :meth:`SimEngine.generate` returns. A request's stats are reported when its
consumer releases the stream (exhausted, closed or dropped), not when the core ends it: like vLLM's
output processor, the server may still turn the final output's finish reason into "stop" when it
holds a stop string.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Protocol

from kvstack.engine.sim.scheduler import SimSeq
from kvstack.engine.sim.types import FinishedRequestStats, FinishReason, RequestOutput


class _Owner(Protocol):
    """The engine, as a stream sees it."""

    def abort(self, request_id: str, reason: FinishReason = "abort") -> None: ...

    def release(self, req: Req) -> None: ...


@dataclass(slots=True, eq=False)
class Req(SimSeq):
    """A request with what the core needs to stream it and to report its stats."""

    max_tokens: int = 0
    n: int = 1
    arrival: float = 0.0
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float = 0.0
    itls: list[float] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False  # the stream gave its final output or was closed
    released: bool = False  # the consumer is done with the stream
    final: FinishedRequestStats | None = None  # set when the request ends, reported on release
    reported: bool = False


class RequestStream:
    """The async iterator :meth:`SimEngine.generate` returns; closing it early aborts."""

    __slots__ = ("_engine", "_req")

    def __init__(self, engine: _Owner, req: Req) -> None:
        self._engine = engine
        self._req = req

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        req = self._req
        if req.closed:
            self._engine.release(req)
            raise StopAsyncIteration
        while not req.pending and not req.finished:
            req.event.clear()
            try:
                await req.event.wait()
            except BaseException:
                self._engine.abort(req.request_id)  # the consumer went away (cancelled)
                raise
        tokens = req.pending
        req.pending = []
        if req.finished:
            req.closed = True
            return RequestOutput(tokens, True, req.finish_reason, req.num_cached_tokens)
        return RequestOutput(tokens, False, None, req.num_cached_tokens)

    async def aclose(self) -> None:
        req = self._req
        if not req.closed:
            req.closed = True
            self._engine.abort(req.request_id)
        self._engine.release(req)

    def __del__(self) -> None:
        # A consumer cancelled outside __anext__ (e.g. while sending a chunk) just drops the
        # iterator: abort then, so the blocks do not stay pinned until the request ends.
        req = self._req
        with contextlib.suppress(Exception):
            if not req.closed and not req.finished:
                req.closed = True
                self._engine.abort(req.request_id)
            self._engine.release(req)


def finished_stats(req: Req, now: float) -> FinishedRequestStats:
    """What vLLM's per-request histograms observe for ``req``, which ended at ``now``."""
    scheduled = req.scheduled_at if req.scheduled_at is not None else now
    first = req.first_token_at
    return FinishedRequestStats(
        finish_reason=req.finish_reason or "abort",
        prompt_tokens=req.num_prompt,
        generation_tokens=req.num_generated,
        max_tokens=req.max_tokens,
        n=req.n,
        ttft=None if first is None else first - req.arrival,
        inter_token_latencies=req.itls,
        queue_time=max(scheduled - req.arrival, 0.0),
        prefill_time=0.0 if first is None else max(first - scheduled, 0.0),
        decode_time=0.0 if first is None else req.last_token_at - first,
        inference_time=max((req.last_token_at if first else now) - scheduled, 0.0),
        e2e_latency=now - req.arrival,
        prefill_kv_computed_tokens=max(req.num_prompt - req.num_cached_tokens, 0),
    )
