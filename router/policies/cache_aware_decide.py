"""The cache-aware decision (pure): the engine with the lowest estimated time to first token, with guards.

Per candidate: ``est_ttft = base + ((queued uncached prefill + this request's uncached tokens) /
prefill_rate + decode interference) x device slowdown + tier loads``, where the queue ahead takes
at least as long as the engine says its requests wait of late (``queue_wait_s``: for KV blocks or
a batch slot, which the queued prefill does not show). ``prefill_rate`` is the
engine's rate as flow control learns it from observed TTFTs (:func:`rate_of`), else the configured
prior. The slowdown is 1 for an
engine with a device of its own; engines sharing one (several on a GPU) split its time, so one runs
slower while others on its device are busy (:func:`device_slowdown`). Sending a request to an idle
engine there slows its busy neighbours and is itself slowed; a busy engine batches it at no such
cost: the cost adds the time waking an idle engine adds to the prefill queued on its busy
neighbours. The cost also adds ``uncached_weight`` x the
request's own uncached prefill time (the compute it costs the cluster). Guards:

* bounded load: a holder above ``load_factor`` x the mean load (and ``load_slack`` requests above
  it) is skipped unless its cache saving outweighs its queueing and covers ``replicate_below`` of
  the prompt. Engines sharing a device are bounded together: each is measured by its device's
  load (``CandidateView.bound_load``), since an idle engine beside a busy one adds no compute, only
  the slowdown the estimate already prices;
* hot-prefix replication: every holder skipped, so warm the least-loaded other engine;
* cold spreading: no hit anywhere, so the least recently cold-served of the near-best engines;
* balance among near-equals: the least loaded of the engines within a slack of the best cost;
* optional exploration (off by default; a seeded RNG) and a soft session bonus.

Ties break by a hash of (request, engine), so replicas fed the same events and requests decide the
same way, and never toward the first engine."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from kvstack.router.policies.cache_aware_settings import CacheAwareSettings


class CandidateView(NamedTuple):
    """What the decision needs to know about one engine for one request (a tuple: one is built per
    engine per request, and a frozen dataclass costs several times more to build)."""

    hit_tokens: float  # tier-weighted tokens of this request the engine can serve from cache
    queued_tokens: float  # uncached prefill tokens already waiting there
    running: float  # requests decoding there
    load: float  # requests in flight there (the bounded-load measure)
    load_s: float = 0.0  # LMCache loads slower than computing the same tokens (seconds)
    last_cold: int = -1  # when it last took a no-hit request (a counter); -1: never
    session: bool = False  # the request's session was last sent here
    tiebreak: int = 0
    device_busy: int = 0  # other engines busy on the device it shares (0: a device of its own)
    device_queued: float = 0.0  # uncached prefill tokens queued on those busy neighbours
    # the bounded-load guard's measure: ``load``, or the candidates' load on the device it shares
    bound_load: float | None = None
    prefill_rate: float = 0.0  # its learnt prefill tokens/s; 0: not known, use the settings' prior
    # its device's learnt speeds with 2, 3, ... busy (``shared_device_speed``'s shape); None: the prior
    speeds: tuple[float, ...] | None = None
    # how long its requests waited in its own queue of late, as it reports (router/queue_wait.py)
    queue_wait_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    reason: str  # cache_hit | load | cold | replicate | explore
    est_ttft_s: float


def device_slowdown(busy_others: int, speeds: Sequence[float]) -> float:
    """How many times slower than alone an engine computes with ``busy_others`` other engines busy
    on its device. ``speeds``: its measured speed relative to alone with 2, 3, ... engines busy;
    past the last entry (and with none) the device's time is shared equally among the busy ones."""
    if busy_others <= 0:
        return 1.0
    busy = busy_others + 1
    if busy - 2 < len(speeds):
        return 1.0 / speeds[busy - 2]
    if speeds:  # the last measured speed, shared further: k engines get (last's k) / k of it each
        last_busy = len(speeds) + 1
        return busy / (speeds[-1] * last_busy)
    return float(busy)


def rate_of(v: CandidateView, s: CacheAwareSettings) -> float:
    """The prefill tokens/s that prices ``v``'s queue: its learnt rate, else the configured prior.

    A fixed prior of another GPU (34K tokens/s: an H200 alone) priced two LMCache engines sharing
    an H100 (~5-10K each) 6-40x too fast: a queue looked nearly free, so one engine holding the
    shared system prompt took every request (bench-results/lmcache section 17)."""
    return v.prefill_rate if v.prefill_rate > 0 else s.prefill_tokens_per_s


def speeds_of(v: CandidateView, s: CacheAwareSettings) -> tuple[float, ...]:
    """How ``v``'s device slows its engines as more are busy: learnt (flow/device_speed.py), else
    the configured ``shared_device_speed``."""
    return s.shared_device_speed if v.speeds is None else v.speeds


def est_ttft(prompt_tokens: int, v: CandidateView, s: CacheAwareSettings) -> float:
    """Estimated seconds to first token on the engine of ``v``."""
    uncached = max(0.0, prompt_tokens - v.hit_tokens)
    work = v.queued_tokens + uncached
    steps = max(1, math.ceil(work / s.prefill_chunk_tokens))
    decode_s = v.running * s.decode_step_s_per_running * steps
    slow = device_slowdown(v.device_busy, speeds_of(v, s)) if v.device_busy else 1.0
    rate = rate_of(v, s)
    modelled = (work / rate + decode_s) * slow
    if v.queue_wait_s > 0:  # what the engine says its requests wait is a floor for the queue
        modelled = max(modelled, v.queue_wait_s + uncached / rate * slow)
    return s.base_ttft_s + modelled + v.load_s


def woken_s(v: CandidateView, s: CacheAwareSettings) -> float:
    """The time an idle engine on a shared device, woken by a request, adds to the prefill queued on
    its busy neighbours: each then shares the device with one more busy engine."""
    if v.load > 0 or v.device_busy <= 0 or v.device_queued <= 0:
        return 0.0
    speeds = speeds_of(v, s)
    extra = device_slowdown(v.device_busy, speeds) - device_slowdown(v.device_busy - 1, speeds)
    return v.device_queued * extra / rate_of(v, s)


def decide(
    prompt_tokens: int, views: Sequence[CandidateView], s: CacheAwareSettings, rng: random.Random
) -> Choice:
    """Pick one of ``views`` (non-empty). Pure but for the draws it takes from ``rng``."""
    ttft = [est_ttft(prompt_tokens, v, s) for v in views]
    loads = [v.load if v.bound_load is None else v.bound_load for v in views]
    mean = sum(loads) / len(views)
    bound = max(s.load_factor * mean, mean + s.load_slack)

    def skipped(i: int) -> bool:
        v = views[i]
        if loads[i] <= bound:
            return False
        if v.hit_tokens < s.replicate_below * prompt_tokens:
            return True  # mostly recomputed anyway: warming another engine costs little
        slow = device_slowdown(v.device_busy, speeds_of(v, s))
        rate = rate_of(v, s)
        queue_s = ttft[i] - s.base_ttft_s - v.load_s - slow * max(0.0, prompt_tokens - v.hit_tokens) / rate
        # The saving counts the recompute's cost to the cluster as ``cost`` does: weighing the
        # user's wait alone sent a long document elsewhere to skip one prefill ahead of it.
        saving_s = (1.0 + s.uncached_weight) * slow * v.hit_tokens / rate
        return saving_s <= queue_s  # its saving does not outweigh its queueing

    everyone = range(len(views))
    pool = [i for i in everyone if not skipped(i)] or list(everyone)

    def best(ids: Sequence[int], key: Callable[[int], tuple[float, ...]]) -> int:
        return min(ids, key=lambda i: (*key(i), views[i].tiebreak))

    if s.explore_rate > 0 and len(pool) > 1 and rng.random() < s.explore_rate:
        i = pool[rng.randrange(len(pool))]
        return Choice(i, "explore", ttft[i])
    holders = [i for i in everyone if views[i].hit_tokens > 0]
    if holders and all(skipped(i) for i in holders):
        others = [i for i in pool if views[i].hit_tokens <= 0]
        if others:
            i = best(others, lambda i: (views[i].load, ttft[i]))
            return Choice(i, "replicate", ttft[i])
    if not holders:
        floor = min(ttft[i] for i in pool)
        near = [i for i in pool if ttft[i] <= floor + s.cold_slack_s]
        i = best(near, lambda i: (views[i].last_cold, ttft[i]))
        return Choice(i, "cold", ttft[i])

    def cost(i: int) -> float:
        v = views[i]
        own = s.uncached_weight * max(0.0, prompt_tokens - v.hit_tokens) / rate_of(v, s)
        return ttft[i] + own + woken_s(v, s) - (s.session_bonus_s if v.session else 0.0)

    costs = {i: cost(i) for i in pool}
    floor = min(costs.values())
    near = [i for i in pool if costs[i] <= floor + s.balance_slack_s]
    i = best(near, lambda i: (views[i].load, costs[i]))
    return Choice(i, "cache_hit" if views[i].hit_tokens > 0 else "load", ttft[i])
