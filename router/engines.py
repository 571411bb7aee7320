"""What the router knows about each engine, and the registry that discovery keeps in sync.

Discovery (static or Kubernetes) says which engines exist; probes and metric scrapes fill in
health and load; the proxy counts in-flight requests; policies read :class:`EngineState`
snapshots and never do I/O. Everything here runs on the router's event loop, so no locks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvstack.router.ejection import OutlierTrack

if TYPE_CHECKING:
    from kvstack.router.shared_load import LoadCell


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One engine as discovery sees it."""

    url: str  # base URL without a trailing slash, e.g. "http://127.0.0.1:8101"
    name: str  # a stable, human-readable id: the pod name, or the URL for static discovery
    models: frozenset[str] = frozenset()  # empty: learn them from the engine's /v1/models
    kv_events_endpoint: str | None = None  # e.g. "tcp://127.0.0.1:5557"; None: engine publishes none
    kv_events_replay_endpoint: str | None = None
    # engines naming the same device share one accelerator's time (several engines on one GPU,
    # GPU time-slicing): each runs slower while the others are busy. None: the engine's own.
    device: str | None = None


@dataclass(slots=True)
class EngineState:
    """Live state of one engine. Fields below ``endpoint`` are updated in place."""

    endpoint: Endpoint
    models: frozenset[str] = frozenset()  # base models and loaded LoRA adapters alike
    adapters: dict[str, str] = field(default_factory=dict)  # adapter -> its base model (/v1/models parent)
    # health: failed probes mark it unhealthy (the monitor), failed requests eject it (the proxy)
    healthy: bool = True
    outlier: OutlierTrack = field(default_factory=OutlierTrack)
    # monotonic time it last answered one of our requests (a whole answer, or a stream's first
    # token); 0: never. A probe that times out meanwhile finds it busy, not down (router/monitor.py)
    last_answer: float = 0.0
    # kept by the router itself: requests this process dispatched there and not yet finished (the
    # proxy counts them through ``in_flight``, which adds the other workers' from the shared table)
    own_in_flight: int = 0
    # scraped from the engine's /metrics (vLLM 0.24 names); None until the first scrape
    num_running: float | None = None
    num_waiting: float | None = None
    kv_cache_usage: float | None = None
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    last_scrape: float = 0.0  # monotonic time of the last successful scrape
    # how long its requests waited in its queue of late (router/queue_wait.py); 0: none or unknown
    queue_wait_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    # called when the router declares the engine down: each ends one request in flight there
    on_down: set[Callable[[], None]] = field(default_factory=set)
    # with several router workers: this engine's column of the shared load table (router/shared_load.py)
    load_cell: LoadCell | None = field(default=None, repr=False, compare=False)
    _peers_seen: int = field(default=0, init=False, repr=False, compare=False)

    @property
    def in_flight(self) -> int:
        """Requests the router has dispatched to the engine and not yet finished: this process's and,
        with several workers, the others' (read from the shared table at each call)."""
        cell = self.load_cell
        if cell is None:
            return self.own_in_flight
        peers = self._peers_seen = cell.peers()
        return self.own_in_flight + peers

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        # ``engine.in_flight += 1`` reads, then writes, with nothing in between on this event loop:
        # the difference from what was just read is all this process's, and it is published at once
        own = self.own_in_flight = value - self._peers_seen
        if self.load_cell is not None:
            self.load_cell.publish(own)

    def attach_load(self, cell: LoadCell) -> None:
        """Share this engine's in-flight count with the other workers through ``cell``."""
        self.load_cell, self._peers_seen = cell, 0
        cell.publish(self.own_in_flight)

    def detach_load(self) -> bool:
        """Stop sharing (the engine left discovery): the cell goes back to zero; False if none."""
        cell = self.load_cell
        if cell is None:
            return False
        cell.publish(0)
        self.load_cell, self._peers_seen = None, 0
        return True

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def base_models(self) -> frozenset[str]:
        """The models that are not LoRA adapters."""
        return self.models - self.adapters.keys()

    @property
    def ejected_until(self) -> float:
        """Monotonic time the engine's ejection ends; 0: never ejected."""
        return self.outlier.ejected_until

    @property
    def consecutive_failures(self) -> int:
        return self.outlier.consecutive

    @property
    def load(self) -> float:
        """Requests the engine is busy with: the router's own count, or the engine's if larger."""
        engine_side = (self.num_running or 0.0) + (self.num_waiting or 0.0)
        return max(float(self.in_flight), engine_side)

    def available(self, now: float) -> bool:
        """Healthy, not ejected, and serving at least one model."""
        return self.healthy and now >= self.outlier.ejected_until and bool(self.models)

    def declare_down(self) -> None:
        """Unhealthy: no new requests, and those in flight end now (the engine will not answer them)."""
        self.healthy = False
        for end in list(self.on_down):
            end()


def routable(
    engines: Iterable[EngineState],
    model: str,
    now: float,
    tried: Collection[str] = (),
    loadable: Collection[str] = (),
) -> list[EngineState]:
    """The engines of ``model`` a request may go to, the URLs in ``tried`` left out.

    1. the available ones: healthy, not ejected, serving ``model``;
    2. none left: the healthy ones serving it that are only ejected (Envoy's panic routing). An
       ejection ranks engines; on its own it never leaves a model with no engine: the engine
       ejected a minute ago may be back (a restarted pod), while the one left has just died and
       its probes have not caught up. Without this, a request that found that one dead was a 502
       with a working engine beside it, and every request a 503 once the probes marked it down;
       except for a LoRA adapter the router can load (``loadable``: declared, with a loader) while
       an available engine of its base model does not hold it yet: nothing, so the request is held
       and the adapter loaded there (:mod:`kvstack.router.adapters`), rather than sent to the
       engine whose failures ejected it;
    3. an unhealthy engine (its probes fail) is never taken.
    """
    serving = [e for e in engines if model in e.models and e.healthy and e.url not in tried]
    available = [e for e in serving if e.available(now)]
    if available or model not in loadable:
        return available or serving
    bases = {e.adapters[model] for e in serving if model in e.adapters}
    if any(e.available(now) and not bases.isdisjoint(e.models) for e in engines if e.url not in tried):
        return []
    return serving


class EngineRegistry:
    """The set of known engines, keyed by URL."""

    def __init__(self) -> None:
        self._engines: dict[str, EngineState] = {}
        # bumped when an engine joins, leaves, or its endpoint changes (another pod at its URL, a new
        # KV-event endpoint): what the monitor and the KV-event subscriber follow
        self.generation = 0
        # its followers' waits for the next bump (a future each: a wait ended by its loop's shutdown
        # leaves nothing behind for a registry used again under another loop)
        self._waiters: list[asyncio.Future[None]] = []
        # called (on the event loop) when an engine may have become available or unavailable:
        # held requests and admission-queue waiters are woken by this, not by polling
        self.listeners: list[Callable[[], None]] = []
        # LoRA adapters the router loads on demand (declared, with the loader on): an adapter whose
        # holders are all ejected is loaded on another engine, not routed to them (:func:`routable`)
        self.loadable: frozenset[str] = frozenset()

    def changed(self) -> None:
        """Tell the listeners that membership, health or served models changed."""
        for listener in self.listeners:
            listener()

    async def next_generation(self, seen: int) -> int:
        """Wait until :attr:`generation` is no longer ``seen``; returns it. Its followers wait here
        instead of polling it (two 5 Hz polls were ten of an idle router's ~25 wake-ups a second)."""
        while self.generation == seen:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return self.generation

    def _bump(self) -> None:
        self.generation += 1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def sync(self, endpoints: Iterable[Endpoint]) -> tuple[list[EngineState], list[EngineState]]:
        """Make the registry hold exactly ``endpoints``; returns (added, removed)."""
        wanted: Mapping[str, Endpoint] = {ep.url: ep for ep in endpoints}
        removed = [st for url, st in self._engines.items() if url not in wanted]
        for st in removed:
            del self._engines[st.url]
        added: list[EngineState] = []
        moved = updated = False
        for url, ep in wanted.items():
            current = self._engines.get(url)
            if current is None:
                st = EngineState(endpoint=ep, models=ep.models)
                self._engines[url] = st
                added.append(st)
            elif current.endpoint != ep:
                current.endpoint, moved = ep, True
                if ep.models:
                    current.models = ep.models
                    updated = True
        if added or removed or moved:
            self._bump()
        if added or removed or updated:
            self.changed()
        return added, removed

    def get(self, url: str) -> EngineState | None:
        return self._engines.get(url)

    def all(self) -> list[EngineState]:
        return list(self._engines.values())

    def candidates(self, model: str, now: float, tried: Collection[str] = ()) -> list[EngineState]:
        """The engines a request for ``model`` may go to, those at ``tried`` URLs left out
        (:func:`routable`, with :attr:`loadable`)."""
        return routable(self._engines.values(), model, now, tried, self.loadable)

    def models(self, now: float) -> set[str]:
        """The union of models over available engines."""
        out: set[str] = set()
        for st in self._engines.values():
            if st.available(now):
                out |= st.models
        return out

    def __len__(self) -> int:
        return len(self._engines)

    def __bool__(self) -> bool:
        # A registry is a shared object, not a value: an empty one must not read as "none given"
        # (``registry or EngineRegistry()`` would silently detach a policy from discovery).
        return True
