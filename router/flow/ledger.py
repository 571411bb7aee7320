"""The router's ledger of one engine: prefill work it was sent and has not done, its prefill rate,
its waiting queue since the last scrape, and its learnt batch capacity. No clock: times are given."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvstack.router.engines import EngineState
from kvstack.router.flow.saturation import RUN_SAMPLES, learn_slots


@dataclass(frozen=True, slots=True)
class Prefill:
    """One request's prefill at an engine, as the router expects it."""

    tokens: float  # uncached prompt tokens
    due: float  # when its first token should have come (expected prefill + the target), at the latest
    streamed: bool  # a stream's first token is seen; a whole answer's is not, so it counts until ``due``
    priority: int = 0  # its class's: a lower class's outstanding prefill keeps engines from a higher one
    tenant: str = ""  # whose: a tenant under its share of the prefill in flight is not refused with room


@dataclass(slots=True)
class EngineFlow:
    """The router's ledger of one engine: prefill work sent and not yet done, its prefill rate."""

    rate: float
    device: str | None = None  # the device it shares with other engines (Endpoint.device)
    measured: bool = False  # ``rate`` was learnt from its own prefills (else the configured default)
    # its latest prefill-rate samples (saturation.learn_rate looks for a run of them far off the rate)
    samples: deque[float] = field(default_factory=lambda: deque(maxlen=RUN_SAMPLES))
    prefill: dict[int, Prefill] = field(default_factory=dict)  # by grant id
    # requests of this router that ended there since its last scrape: each freed a slot that a
    # waiting request took, so its queue as scraped less these is its queue now (those sent since
    # are the prefill backlog's to weigh: counting them as waiting would allow one per scrape)
    scrape_stamp: float = 0.0
    ended: int = 0
    slots: float | None = None  # learnt batch capacity (saturation.learn_slots)

    def waiting(self, engine: EngineState) -> float | None:
        """The engine's waiting queue now: its last scrape corrected by what happened since."""
        if engine.last_scrape != self.scrape_stamp:
            self.scrape_stamp, self.ended = engine.last_scrape, 0
            self.slots = learn_slots(
                self.slots, engine.num_running, engine.num_waiting, engine.kv_cache_usage
            )
        if engine.num_waiting is None:
            return None
        return max(0.0, engine.num_waiting - self.ended)

    def backlog(self, now: float) -> float:
        """Uncached tokens sent and not yet prefilled (a whole answer's: until it is due)."""
        done = [k for k, p in self.prefill.items() if not p.streamed and p.due <= now]
        for k in done:
            del self.prefill[k]
        return sum(p.tokens for p in self.prefill.values())

    def backlog_by_tenant(self, now: float, into: dict[str, float]) -> None:
        """Add each tenant's uncached tokens sent and not yet prefilled to ``into``."""
        self.backlog(now)
        for p in self.prefill.values():
            into[p.tenant] = into.get(p.tenant, 0.0) + p.tokens

    def holds_below(self, priority: int, now: float) -> bool:
        """Whether prefill of a class below ``priority`` is outstanding here (a whole answer's: until due)."""
        self.backlog(now)
        return any(p.priority < priority for p in self.prefill.values())

    def queueing(self, now: float) -> bool | None:
        """Whether the engine is queueing this router's requests: a stream sent there is past due
        without its first token (True), every one is on time (False), or none to tell by (None)."""
        streams = [p for p in self.prefill.values() if p.streamed]
        if not streams:
            return None
        return any(p.due <= now for p in streams)

    def behind(self, now: float, within_s: float) -> bool:
        """Whether a stream sent here is past due without its first token by at most ``within_s``:
        the engine is behind now. One late by longer is stuck there, not slowed by its GPU."""
        return any(p.streamed and now - within_s < p.due <= now for p in self.prefill.values())
