"""Cache-aware routing: the policy's state around the pure decision (``cache_aware_decide``).

Per request it builds one ``CandidateView`` per engine: the tier-weighted hit from the KV-block
index (a GPU hit counted for the share expected to survive the queue ahead of it when
``residency`` is on; the rest reloads from LMCache or recomputes), the queued uncached prefill
from local accounting reconciled with scrapes (``PrefillLedger``), LMCache loads slower than
computing (``cache_aware_tiers``, their cost per token learnt online from observed TTFTs), and the
session it last served. It then records the dispatch (speculative index entries, queued tokens,
the session) and releases it at the first token or the end.
"""

from __future__ import annotations

import functools
import logging
import random
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash
from pydantic import BaseModel, ConfigDict, Field

from kvstack.common.tasks import BackgroundTask
from kvstack.router.adapters import kv_scope
from kvstack.router.engines import EngineRegistry, EngineState
from kvstack.router.kvindex.follow import follow_registry
from kvstack.router.kvindex.index import IndexSettings, KVIndex
from kvstack.router.kvindex.keys import KeyCache, request_root
from kvstack.router.kvindex.ledger import PrefillLedger
from kvstack.router.kvindex.subscriber import KVEventSubscriber, SubscriberSettings
from kvstack.router.policies.base import (
    Decision,
    DeviceSpeeds,
    ExpectedHit,
    Policy,
    RequestFeatures,
)
from kvstack.router.policies.cache_aware_decide import CandidateView, decide, est_ttft, rate_of
from kvstack.router.policies.cache_aware_log import decision_log, log_decision
from kvstack.router.policies.cache_aware_settings import CacheAwareSettings
from kvstack.router.policies.cache_aware_tiers import TierModel
from kvstack.router.policies.shared_device import device_loads, device_neighbours, sharing
from kvstack.router.residency import TierTokens

log = logging.getLogger(__name__)


# a session entry besides its key string: the ordered dict's slot and link (CPython 3.11, measured
# in tests/router/test_memory_bounds.py; the engine URL it maps to is shared)
SESSION_ENTRY_BYTES = 120


@dataclass(slots=True)
class PolicyStats:
    """What the router exports and the benchmarks read."""

    decisions: int = 0
    predicted_hit_tokens: float = 0.0  # summed over decisions
    prompt_tokens: int = 0  # summed over decisions
    last_predicted_hit_tokens: int = 0
    reasons: Counter[str] | None = None
    # decisions where an engine holding a GPU hit was expected to lose most of it (residency < 0.5)
    # to eviction before the request would run there
    residency_discounted: int = 0


@dataclass(slots=True)
class _Pending:
    url: str
    keys: tuple[int, ...]
    uncached: float
    queued: float
    cold: bool
    tiers: TierTokens  # where the chosen engine was expected to serve the hit from
    est_ttft_s: float
    rate: float  # the prefill tokens/s its estimate used
    dispatched_at: float = 0.0


class CacheAwarePolicy(Policy):
    """The ``cache_aware`` routing policy over a :class:`KVIndex`."""

    name = "cache_aware"
    needs_tokens = True

    def __init__(
        self,
        index: KVIndex,
        settings: CacheAwareSettings | None = None,
        *,
        rng: random.Random | None = None,
        key_cache: KeyCache | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index = index
        self.settings = s = settings or CacheAwareSettings()
        self.rng = rng or random.Random(s.seed)
        self.keys = key_cache or KeyCache()
        self.clock = clock
        self.ledger = PrefillLedger(
            chunk_tokens=s.prefill_chunk_tokens, tokens_per_waiting=s.tokens_per_waiting
        )
        self.stats = PolicyStats(reasons=Counter())
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self.session_bytes = 0  # what _sessions holds, as max_session_bytes counts it
        self._cold: dict[str, int] = {}
        self._tick = 0
        self.tiers = TierModel(index, s.tier_learning, s.prefill_tokens_per_s, residency=s.residency)
        self._started: OrderedDict[str, _Pending] = OrderedDict()  # dispatched, no first token yet
        # every engine, for the busy ones on a shared device that are not candidates (flow control
        # narrows the candidates to engines with room; another model's engine shares the GPU too)
        self.registry: EngineRegistry | None = None
        self.rates: Callable[[EngineState], float] | None = None  # see use_prefill_rates
        self.speeds: DeviceSpeeds | None = None

    def use_prefill_rates(
        self, rate: Callable[[EngineState], float], speeds: DeviceSpeeds | None = None
    ) -> None:
        """Price each engine's queue at ``rate(engine)`` (flow control's learnt prefill rate)
        instead of the fixed ``prefill_tokens_per_s`` prior, and a shared device's slowdown at
        ``speeds(device, prior)`` instead of ``shared_device_speed``; the prefill ledger holds a
        request's tokens for as long as that rate says its prefill takes."""
        self.rates, self.speeds = rate, speeds

    def choose(self, request: RequestFeatures, candidates: Sequence[EngineState], now: float) -> Decision:
        tokens = request.prompt_token_ids or ()
        n_tokens = len(tokens) if request.prompt_len is None else request.prompt_len
        base, lora = kv_scope(request.model, candidates)  # an adapter's keys: its own scope
        root = request_root(base, lora, request.cache_salt)
        session_url = self._sessions.get(request.session_key) if request.session_key else None
        index = self.index
        # ties break by a hash of (request, engine): seeded by the request, hashed per engine URL
        tie_seed = xxhash.xxh3_64_intdigest(request.request_id.encode())
        views: list[CandidateView] = []
        keys_of: list[tuple[int, ...]] = []
        keys_at: dict[int, tuple[int, ...]] = {}  # by block size: engines of a model share one
        tracing = decision_log.isEnabledFor(logging.DEBUG)  # kvstack.bench.trace reads it
        queued: list[float] = []
        for st in candidates:
            url = st.url
            size = index.ensure_engine(
                url,
                block_size=st.block_size,
                num_gpu_blocks=st.num_gpu_blocks,
                events=st.endpoint.kv_events_endpoint is not None,
            )
            keys = keys_at.get(size)
            if keys is None:
                keys = keys_at[size] = self.keys.keys(tokens, size, root)
            keys_of.append(keys)
            queued.append(self._queued(st, now))
        estimates = self.tiers.estimates(candidates, keys_of, queued, n_tokens, now, self.tiers.weights())
        engines = candidates if self.registry is None else self.registry.all()
        known = {st.url: q for st, q in zip(candidates, queued, strict=True)}  # computed above

        def queued_on(st: EngineState) -> float:
            return known[st.url] if st.url in known else self._queued(st, now)

        neighbours = device_neighbours(candidates, engines, queued_on)
        rates, learnt = self.rates, self.speeds
        prior = self.settings.shared_device_speed
        speeds_at: dict[str, tuple[float, ...]] = {}  # each device's speeds, found once a request

        def device_speeds(device: str) -> tuple[float, ...]:
            if device not in speeds_at:
                speeds_at[device] = prior if learnt is None else learnt(device, prior)
            return speeds_at[device]

        bound_loads = device_loads(candidates, lambda device: sharing(device_speeds(device)))
        for st, est, q, (busy, busy_queued), bound_load in zip(
            candidates, estimates, queued, neighbours, bound_loads, strict=True
        ):
            url = st.url
            views.append(
                CandidateView(
                    hit_tokens=est.hit_tokens,
                    queued_tokens=q,
                    running=st.num_running if st.num_running is not None else float(st.in_flight),
                    load=st.load,
                    load_s=est.load_s,
                    last_cold=self._cold.get(url, -1),
                    session=url == session_url,
                    tiebreak=xxhash.xxh3_64_intdigest(url.encode(), seed=tie_seed),
                    device_busy=busy,
                    device_queued=busy_queued,
                    bound_load=bound_load,
                    prefill_rate=0.0 if rates is None else rates(st),
                    speeds=None if learnt is None or not busy else device_speeds(st.endpoint.device or ""),
                    queue_wait_s=st.queue_wait_s if st.load > 0 else 0.0,  # an idle engine: no queue
                )
            )
        choice = decide(n_tokens, views, self.settings, self.rng)
        if tracing:
            ttfts = [est_ttft(n_tokens, v, self.settings) for v in views]
            costs = self.tiers.costs
            log_decision(request.request_id, n_tokens, candidates, views, estimates, choice, ttfts, costs)
        v = views[choice.index]
        chosen = candidates[choice.index]
        self._remember(
            request.request_id,
            _Pending(
                chosen.url,
                keys_of[choice.index],
                max(0.0, n_tokens - v.hit_tokens),
                v.queued_tokens,
                choice.reason == "cold",
                estimates[choice.index].tiers,
                choice.est_ttft_s,
                rate_of(v, self.settings),
            ),
        )
        hit = int(v.hit_tokens)
        st_ = self.stats
        st_.decisions += 1
        st_.predicted_hit_tokens += v.hit_tokens
        st_.prompt_tokens += n_tokens
        st_.last_predicted_hit_tokens = hit
        if any(e.resident < 0.5 for e in estimates):
            st_.residency_discounted += 1
        assert st_.reasons is not None
        st_.reasons[choice.reason] += 1
        return Decision(engine=chosen, reason=choice.reason, predicted_hit_tokens=hit)

    def expected_hit(
        self, request: RequestFeatures, candidates: Sequence[EngineState], now: float
    ) -> ExpectedHit:
        """The best candidate's hit (as :meth:`choose` weighs it: residency and learnt tier costs)
        and its tier loads' excess time, without deciding."""
        tokens = request.prompt_token_ids or ()
        if not tokens or not candidates:
            return ExpectedHit(0.0)
        base, lora = kv_scope(request.model, candidates)
        root = request_root(base, lora, request.cache_salt)
        keys_of = []
        for st in candidates:
            size = self.index.ensure_engine(
                st.url,
                block_size=st.block_size,
                num_gpu_blocks=st.num_gpu_blocks,
                events=st.endpoint.kv_events_endpoint is not None,
            )
            keys_of.append(self.keys.keys(tokens, size, root))
        queued = [self._queued(st, now) for st in candidates]
        weights = self.tiers.weights()
        estimates = self.tiers.estimates(candidates, keys_of, queued, len(tokens), now, weights)
        best = max(estimates, key=lambda e: e.hit_tokens)
        return ExpectedHit(best.hit_tokens, best.load_s)

    def _queued(self, st: EngineState, now: float) -> float:
        """Uncached prefill tokens queued on ``st``: local accounting reconciled with its scrape."""
        scraped = st.last_scrape if st.num_waiting is not None and st.last_scrape > 0 else None
        return self.ledger.queued(st.url, now, scraped_at=scraped, num_waiting=st.num_waiting)

    def on_dispatch(self, request: RequestFeatures, decision: Decision) -> None:
        p = self._pending.pop(request.request_id, None)
        if p is None or p.url != decision.engine.url:
            return
        now, s = self.clock(), self.settings
        self.index.record_dispatch(p.url, p.keys, now)
        hold = s.prefill_deadline_factor * (p.queued + p.uncached) / p.rate
        self.ledger.add(request.request_id, p.url, p.uncached, now, now + hold + s.prefill_deadline_floor_s)
        if p.cold:
            self._tick += 1
            self._cold[p.url] = self._tick
        if request.session_key:
            self._remember_session(request.session_key, p.url)
        p.dispatched_at = now
        kv_tokens = len(p.keys) * self.index.block_size(p.url) + (request.max_tokens or 0)
        self.tiers.order.dispatched(request.request_id, p.url, p.keys, kv_tokens)
        started = self._started
        started[request.request_id] = p
        while len(started) > 10_000:  # a stream that never reports its first token: do not grow
            started.popitem(last=False)

    def on_first_token(self, request: RequestFeatures, decision: Decision) -> None:
        """The prefill is over: release its queued tokens, and learn the tier costs from its TTFT."""
        self.ledger.done(request.request_id, self.clock())
        p = self._started.pop(request.request_id, None)
        if p is not None and p.url == decision.engine.url:
            self.tiers.observe(p.tiers, p.est_ttft_s, self.clock() - p.dispatched_at, p.queued)

    def on_finish(self, request: RequestFeatures, decision: Decision, ok: bool) -> None:
        self._pending.pop(request.request_id, None)
        self._started.pop(request.request_id, None)  # not streamed: no TTFT to learn from
        self.tiers.order.finished(request.request_id)
        self.ledger.done(request.request_id, self.clock())

    def _remember_session(self, key: str, url: str) -> None:
        sessions, s = self._sessions, self.settings
        if key not in sessions:
            self.session_bytes += sys.getsizeof(key) + SESSION_ENTRY_BYTES
        sessions[key] = url
        sessions.move_to_end(key)
        while len(sessions) > s.max_sessions or self.session_bytes > s.max_session_bytes:
            old, _ = sessions.popitem(last=False)
            self.session_bytes -= sys.getsizeof(old) + SESSION_ENTRY_BYTES

    def _remember(self, request_id: str, pending: _Pending) -> None:
        self._pending[request_id] = pending
        while len(self._pending) > 10_000:  # chosen but never dispatched: do not grow forever
            self._pending.popitem(last=False)


class CacheAwareConfig(BaseModel):
    """Everything ``cache_aware`` takes from the router's configuration (``cache_aware:``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    decision: CacheAwareSettings = CacheAwareSettings()
    index: IndexSettings = IndexSettings()
    events: SubscriberSettings = SubscriberSettings()
    # the block-key caches' memory (router/kvindex/keys.py): identity entries, checkpoints, keys
    key_cache_bytes: int = Field(32 * 2**20, ge=64 * 1024)


class CacheAwareRouting(CacheAwarePolicy):
    """The policy plus its lifecycle: KV-event subscribers that follow the engine registry."""

    def __init__(self, registry: EngineRegistry, config: CacheAwareConfig, rng: random.Random | None) -> None:
        keys = KeyCache(max_bytes=config.key_cache_bytes)
        super().__init__(KVIndex(config.index), config.decision, rng=rng, key_cache=keys)
        self.registry: EngineRegistry = registry
        self.subscriber = KVEventSubscriber(self.index, config.events)
        self._follow = BackgroundTask(
            "kv-index", functools.partial(follow_registry, self.registry, self.subscriber), logger=log
        )

    async def start(self) -> None:
        self._follow.start()

    async def stop(self) -> None:
        await self._follow.stop()
        await self.subscriber.close()

    def syncing(self) -> list[str]:
        return self.subscriber.syncing()


def make_policy(
    *, registry: EngineRegistry | None = None, settings: Any = None, rng: random.Random | None = None
) -> CacheAwareRouting:
    """Factory for the router's policy registry; ``settings.cache_aware`` configures it when present."""
    config = getattr(settings, "cache_aware", None)
    if not isinstance(config, CacheAwareConfig):
        config = CacheAwareConfig()
    seeded = rng if config.decision.seed is None else None  # an explicit seed wins
    return CacheAwareRouting(registry or EngineRegistry(), config, seeded)
