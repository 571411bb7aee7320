"""Session affinity: consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018).

A session key hashes to a point on a ring of virtual nodes; the request goes to the first engine
clockwise whose in-flight count stays under ``ceil(load_factor * (total + 1) / n)``. Sessions stick
to one engine (its prefix cache stays warm), engines joining or leaving move only ~1/n of them, and
no engine takes more than ``load_factor`` times the mean. Without a key: least loaded.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence

import xxhash

from kvstack.router.engines import EngineState
from kvstack.router.policies.base import Decision, Policy, RequestFeatures
from kvstack.router.policies.least_loaded import least_loaded

DEFAULT_LOAD_FACTOR = 1.25
DEFAULT_VNODES = 160


def _hash(text: str) -> int:
    return int(xxhash.xxh3_64_intdigest(text.encode()))


class HashRing:
    """Virtual nodes of a fixed set of engine URLs, sorted by hash."""

    def __init__(self, urls: Sequence[str], vnodes: int = DEFAULT_VNODES) -> None:
        points = sorted((_hash(f"{url}#{i}"), url) for url in urls for i in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._urls = [u for _, u in points]

    def walk(self, key: str) -> list[str]:
        """Distinct URLs in ring order, starting at ``key``'s point."""
        start = bisect.bisect_left(self._hashes, _hash(key))
        seen: dict[str, None] = {}
        n = len(self._urls)
        for i in range(n):
            seen.setdefault(self._urls[(start + i) % n], None)
        return list(seen)


def bounded_capacity(total_in_flight: int, n_engines: int, load_factor: float) -> int:
    """The most requests one engine may hold once this one is placed."""
    return max(1, math.ceil(load_factor * (total_in_flight + 1) / n_engines))


def choose_bounded(
    ring: HashRing, key: str, candidates: Sequence[EngineState], load_factor: float
) -> tuple[EngineState, bool]:
    """(engine, overflowed): the first engine on the ring from ``key`` with room under the bound."""
    by_url = {e.url: e for e in candidates}
    cap = bounded_capacity(sum(e.in_flight for e in candidates), len(candidates), load_factor)
    order = [by_url[u] for u in ring.walk(key) if u in by_url]
    for i, engine in enumerate(order):
        if engine.in_flight < cap:
            return engine, i > 0
    return order[0], False  # unreachable in practice: the bound always leaves one engine room


class SessionPolicy(Policy):
    """Sticky routing on the session key (header or OpenAI ``user``), with bounded loads."""

    name = "session"

    def __init__(
        self,
        load_factor: float = DEFAULT_LOAD_FACTOR,
        vnodes: int = DEFAULT_VNODES,
        rng: random.Random | None = None,
    ) -> None:
        if load_factor < 1.0:
            raise ValueError("load_factor must be >= 1")
        self._load_factor = load_factor
        self._vnodes = vnodes
        self._rng = rng or random.Random()
        self._ring_urls: tuple[str, ...] = ()
        self._ring = HashRing((), vnodes)

    def _ring_for(self, candidates: Sequence[EngineState]) -> HashRing:
        urls = tuple(sorted(e.url for e in candidates))
        if urls != self._ring_urls:  # rebuilt only when membership or availability changes
            self._ring_urls = urls
            self._ring = HashRing(urls, self._vnodes)
        return self._ring

    def choose(self, request: RequestFeatures, candidates: Sequence[EngineState], now: float) -> Decision:
        if not request.session_key:
            return Decision(engine=least_loaded(candidates, self._rng), reason="least_loaded")
        engine, overflowed = choose_bounded(
            self._ring_for(candidates), request.session_key, candidates, self._load_factor
        )
        return Decision(engine=engine, reason="session_overflow" if overflowed else "session")
