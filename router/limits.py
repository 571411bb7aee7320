"""Admission control: per-key token buckets and concurrency caps, and the budget of request-body
bytes held in memory. (Queueing per model is flow control's: :mod:`kvstack.router.flow`.)

Decisions are pure given ``now``.
"""

from __future__ import annotations

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
