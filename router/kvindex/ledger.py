"""Local accounting of uncached prefill tokens queued on each engine, reconciled with scrapes.

The router charges an engine the *uncached* tokens of each request it sends there (cached tokens
cost almost nothing to prefill) and releases them at the first token, at the end, or at a
deadline by which the prefill must have happened, so a lost callback cannot leak load. Scraped
``num_requests_waiting`` corrects what local counts cannot see: other router replicas and
traffic that bypasses the router.

A scrape is up to one interval old. Requests of ours it may have counted as waiting, dispatched
before it and started since, no longer wait: each is taken off its ``num_waiting``. Without that,
a scrape that caught a request in the wait queue charged its engine a phantom prompt
(``tokens_per_waiting``) until the next scrape, long after the request ended, and a router sending
one request at a time sent a chat away from the engine holding its prefix.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass


def reconcile(
    fresh: float, older: float, num_waiting: float | None, *, chunk_tokens: int, tokens_per_waiting: float
) -> float:
    """Queued prefill tokens on an engine, given a scrape of ``num_waiting``.

    ``fresh``: tokens we dispatched after the scrape (it cannot know them). ``older``: tokens we
    dispatched before it. An empty wait queue means every older request at least started its
    prefill, so at most one chunk of it is left; a non-empty one is at least that many prompts.
    """
    if num_waiting is None:
        return fresh + older
    if num_waiting <= 0:
        return fresh + min(older, float(chunk_tokens))
    return fresh + max(older, num_waiting * tokens_per_waiting)


# Starts kept per engine, newest: a scrape is one interval old (a second by default), and an
# engine starting more of our requests than this in that time starts them too fast for one phantom
# prompt to matter. Past it the oldest are forgotten and the scrape counts them as it used to.
_STARTED_KEPT = 64


@dataclass(slots=True)
class _Entry:
    url: str
    tokens: float
    at: float
    deadline: float


class PrefillLedger:
    """Uncached prefill tokens per engine, dispatched and not yet prefilled."""

    def __init__(self, *, chunk_tokens: int = 8192, tokens_per_waiting: float = 1024.0) -> None:
        self.chunk_tokens = chunk_tokens
        self.tokens_per_waiting = tokens_per_waiting
        self._entries: dict[str, _Entry] = {}
        self._by_url: dict[str, OrderedDict[str, _Entry]] = {}  # dispatch order
        self._totals: dict[str, float] = {}
        self._deadlines: list[tuple[float, str]] = []
        # per engine, (dispatched at, started at) of requests whose prefill began lately, oldest first
        self._started: dict[str, deque[tuple[float, float]]] = {}

    def add(self, request_id: str, url: str, tokens: float, now: float, deadline: float) -> None:
        self.done(request_id)
        entry = _Entry(url, tokens, now, deadline)
        self._entries[request_id] = entry
        self._by_url.setdefault(url, OrderedDict())[request_id] = entry
        self._totals[url] = self._totals.get(url, 0.0) + tokens
        heapq.heappush(self._deadlines, (deadline, request_id))

    def done(self, request_id: str, now: float | None = None) -> None:
        """The request's prefill is over (first token, finish, abort); idempotent. ``now``: when
        the engine was seen to start it, so a scrape taken before stops counting it as waiting."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return
        if now is not None:
            self._started.setdefault(entry.url, deque(maxlen=_STARTED_KEPT)).append((entry.at, now))
        self._by_url[entry.url].pop(request_id, None)
        left = self._totals[entry.url] - entry.tokens
        self._totals[entry.url] = left if left > 1e-6 else 0.0

    def expire(self, now: float) -> None:
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, rid = heapq.heappop(heap)
            entry = self._entries.get(rid)
            if entry is not None and entry.deadline == deadline:  # not a re-added id
                self.done(rid)
        if len(heap) > 4 * len(self._entries) + 1024:  # ids released early linger here; compact
            self._deadlines = [(d, r) for d, r in heap if r in self._entries]
            heapq.heapify(self._deadlines)

    def local(self, url: str) -> float:
        return self._totals.get(url, 0.0)

    def queued(self, url: str, now: float, *, scraped_at: float | None, num_waiting: float | None) -> float:
        """Queued prefill tokens on ``url``, reconciled with a scrape taken at ``scraped_at``."""
        self.expire(now)
        total = self._totals.get(url, 0.0)
        if scraped_at is None or num_waiting is None:
            return total
        fresh = 0.0
        for entry in reversed(self._by_url.get(url, {}).values()):
            if entry.at <= scraped_at:
                break
            fresh += entry.tokens
        return reconcile(
            fresh,
            total - fresh,
            max(0.0, num_waiting - self._started_since(url, scraped_at)),
            chunk_tokens=self.chunk_tokens,
            tokens_per_waiting=self.tokens_per_waiting,
        )

    def _started_since(self, url: str, scraped_at: float) -> int:
        """Our requests dispatched before the scrape at ``scraped_at`` and started after it."""
        started = self._started.get(url)
        if not started:
            return 0
        while started and started[0][1] <= scraped_at:  # scrapes only move forward: forget these
            started.popleft()
        return sum(1 for at, _ in started if at <= scraped_at)

    def __len__(self) -> int:
        return len(self._entries)
