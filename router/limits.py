"""Admission control: per-key token buckets and concurrency caps, a bounded queue per model, and
the budget of request-body bytes held in memory.

Decisions are pure given ``now``; the queue's waiting uses asyncio futures but no timers of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; each request takes one."""

    rate: float
    burst: float
    tokens: float = -1.0  # -1: full on first use
    stamp: float = 0.0

    def take(self, now: float) -> float:
        """0.0 when a token was taken; otherwise seconds until one will be available."""
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass(slots=True)
class KeyLimiter:
    """Rate limit and concurrency cap per API key (keys are configured, so the maps stay bounded)."""

    rate: float | None
    burst: float | None
    max_concurrency: int | None
    _buckets: dict[str, TokenBucket] = field(default_factory=dict)
    _active: dict[str, int] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.rate is not None or self.max_concurrency is not None

    def admit(self, key: str, now: float) -> tuple[str, float] | None:
        """None when ``key`` may start a request (then call :meth:`release` when it ends).

        Otherwise ``(reason, retry_after_s)`` with reason ``rate_limit`` or ``key_concurrency``.
        """
        if self.max_concurrency is not None and self._active.get(key, 0) >= self.max_concurrency:
            return "key_concurrency", 1.0
        if self.rate is not None:
            bucket = self._buckets.get(key)
            if bucket is None:
                burst = self.burst if self.burst is not None else max(1.0, self.rate)
                bucket = self._buckets[key] = TokenBucket(self.rate, burst)
            wait = bucket.take(now)
            if wait > 0:
                return "rate_limit", wait
        self._active[key] = self._active.get(key, 0) + 1
        return None

    def release(self, key: str) -> None:
        left = self._active.get(key, 0) - 1
        if left > 0:
            self._active[key] = left
        else:
            self._active.pop(key, None)


class BodyBudget:
    """Request-body bytes all in-flight requests hold in memory together, at most ``capacity``.

    A body is held from its first byte until its response ends (retries resend it), so
    :meth:`take` is called as bytes arrive (or once for a declared Content-Length) and
    :meth:`give` with the same total when the request is done. ``capacity`` None: unbounded.
    """

    __slots__ = ("capacity", "held")

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.held = 0

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes; False (nothing held) when that would pass the capacity."""
        if self.capacity is not None and self.held + size > self.capacity:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


class QueueFull(Exception):
    """The model's admission queue is full."""


class QueueTimeout(Exception):
    """A request waited in the admission queue for too long."""


class AdmissionQueue:
    """At most ``capacity`` requests of one model in flight; up to ``max_waiting`` more wait, FIFO.

    Capacity is passed on each call (engines come and go); :meth:`release` hands the freed slot to
    the oldest waiter, so a waiter never loses its turn to a newcomer.
    """

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, capacity: int, max_wait: float) -> None:
        """Take a slot, waiting up to ``max_wait`` s; raises QueueFull or QueueTimeout."""
        if self.active < capacity and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise QueueFull
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(max_wait):
                await fut  # release() counted us in before waking us
        except TimeoutError:
            self._abandon(fut)
            raise QueueTimeout from None
        except BaseException:
            self._abandon(fut)
            raise

    def _abandon(self, fut: asyncio.Future[None]) -> None:
        if fut.done() and not fut.cancelled():
            self.release(capacity=None)  # we were handed a slot after all: pass it on
        else:
            fut.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)

    def release(self, capacity: int | None) -> None:
        """Free a slot and wake waiters while there is room (``capacity`` None: hand over 1:1)."""
        self.active -= 1
        self._admit(1 if capacity is None else capacity - self.active)

    def grow(self, capacity: int) -> None:
        """Capacity may have grown (an engine came up): admit waiters while there is room."""
        self._admit(capacity - self.active)

    def _admit(self, room: int) -> None:
        while self._waiters and room > 0:
            fut = self._waiters.popleft()
            if fut.done():
                continue
            self.active += 1
            room -= 1
            fut.set_result(None)
