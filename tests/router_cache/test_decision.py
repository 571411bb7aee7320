"""The TTFT cost model and its guards (pure; table-driven)."""

from __future__ import annotations

import random

import pytest

from kvstack.router.kvindex.index import IndexSettings, PrefixMatch
from kvstack.router.kvindex.ledger import PrefillLedger, reconcile
from kvstack.router.kvindex.tier_weights import H200_CPU_WEIGHT, H200_SHARED_WEIGHT, tier_weight
from kvstack.router.policies.cache_aware_decide import CandidateView, decide, est_ttft
from kvstack.router.policies.cache_aware_settings import CacheAwareSettings

S = CacheAwareSettings(explore_rate=0.0)
N = 8192  # prompt tokens


def v(hit: float = 0, queued: float = 0, running: float = 0, load: float = 0, **kw: object) -> CandidateView:
    return CandidateView(hit_tokens=hit, queued_tokens=queued, running=running, load=load, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prompt", "view", "lo", "hi"),
    [
        # calibrated against tests/reference/h200-measurements.json (single engine, idle)
        (16384, v(), 0.45, 0.52),  # cold 16K: 0.475 s measured
        (4096, v(), 0.09, 0.14),  # cold 4K: 0.098 s
        (16384, v(hit=16384), 0.0, 0.03),  # full hit: 0.024 s
        (16384, v(hit=16384 * 0.9), 0.05, 0.07),  # 90% hit: 0.086 s
        (1024, v(queued=34_000), 1.0, 1.1),  # a second of queued prefill ahead
        (1024, v(running=128), 0.04, 0.05),  # decode interference: 2.7 ms per step at 128
    ],
)
def test_est_ttft(prompt: int, view: CandidateView, lo: float, hi: float) -> None:
    assert lo <= est_ttft(prompt, view, S) <= hi


@pytest.mark.parametrize(
    ("views", "expected", "reason"),
    [
        pytest.param([v(), v(hit=N), v()], 1, "cache_hit", id="holder-wins"),
        pytest.param([v(hit=4096), v(hit=N)], 1, "cache_hit", id="longer-hit-wins"),
        pytest.param([v(hit=N, queued=200_000), v()], 1, "load", id="queued-prefill-outweighs-hit"),
        pytest.param([v(hit=N, queued=4000), v()], 0, "cache_hit", id="small-queue-keeps-hit"),
        # 14,000 tokens queued at the holder (0.41 s) against recomputing 8,192 elsewhere (0.24 s,
        # plus half that for the cluster's compute): the session moves ...
        pytest.param([v(hit=N, queued=14_000), v()], 1, "load", id="a-long-queue-moves-a-session"),
        # ... unless the other engine would load it from the shared store (LMCache + Redis), 0.5 s
        # beyond computing it (index.shared_store_from_gpu prices it)
        pytest.param(
            [v(hit=N, queued=14_000), v(load_s=0.5)], 0, "cache_hit", id="a-redis-load-keeps-the-session"
        ),
        # bounded load: mean 4, bound 5; a holder at 10 with a short hit is skipped
        pytest.param(
            [v(hit=256, load=10, running=10, queued=2000), v(load=1), v(load=1)],
            1,
            "replicate",
            id="bounded-load-skips-short-hit",
        ),
        # ... unless its saving outweighs its queueing (long hit, little queued)
        pytest.param(
            [v(hit=N, load=10, running=10), v(load=1), v(load=1)],
            0,
            "cache_hit",
            id="bounded-load-keeps-big-saving",
        ),
        # a short shared prefix (a system prompt) on an engine over the bound: its saving beats the
        # queue, but most of the prompt is recomputed anyway, so warm another engine
        pytest.param(
            [v(hit=2048, load=10, running=10), v(load=1), v(load=3)],
            1,
            "replicate",
            id="bounded-load-spreads-a-short-shared-prefix",
        ),
        # the same hit under the bound keeps it
        pytest.param(
            [v(hit=2048, load=4, running=4), v(load=3), v(load=3)],
            0,
            "cache_hit",
            id="short-prefix-under-the-bound-stays",
        ),
        # a long hit over the bound with one like-sized prefill queued ahead: waiting costs the user
        # about what recomputing would, but recomputing also costs the cluster, so it stays
        pytest.param(
            [v(hit=N, load=10, running=10, queued=N + 1000), v(load=1), v(load=1)],
            0,
            "cache_hit",
            id="bounded-load-keeps-a-long-hit-behind-one-prefill",
        ),
        # ... but a queue of several prefills ahead outweighs it
        pytest.param(
            [v(hit=N, load=10, running=10, queued=3 * N), v(load=1), v(load=1)],
            1,
            "replicate",
            id="bounded-load-skips-a-long-hit-behind-a-long-queue",
        ),
        # hot prefix: both holders over the bound, warm the least-loaded non-holder
        pytest.param(
            [v(hit=512, load=9, queued=9000), v(hit=512, load=9, queued=9000), v(load=3), v(load=1)],
            3,
            "replicate",
            id="hot-prefix-replicates",
        ),
        # a light load is no imbalance: a holder with two requests decoding, the others idle, keeps
        # the new session of its system prompt (load_slack; at 1 it was sent to a cold engine)
        pytest.param(
            [v(hit=2048, load=2, running=2), v(), v(), v()],
            0,
            "cache_hit",
            id="light-load-keeps-the-holder",
        ),
        # ... and four above the mean is an imbalance again
        pytest.param(
            [v(hit=2048, load=5, running=5), v(), v(), v()],
            1,
            "replicate",
            id="a-holder-far-above-a-light-mean-spreads",
        ),
        # one holder still under the bound: no replication
        pytest.param(
            [v(hit=512, load=9, queued=9000), v(hit=512, load=2), v(load=1)],
            1,
            "cache_hit",
            id="one-holder-left",
        ),
        # cold: least recently cold-served among near-best engines
        pytest.param([v(last_cold=5), v(last_cold=2), v(last_cold=9)], 1, "cold", id="cold-spreads"),
        pytest.param([v(last_cold=-1), v(last_cold=2)], 0, "cold", id="never-cold-served-first"),
        pytest.param([v(last_cold=1, queued=60_000), v(last_cold=2)], 1, "cold", id="cold-skips-busy"),
        # session: a soft bonus that decides near-ties only
        pytest.param(
            [v(hit=N, tiebreak=0), v(hit=N, session=True, tiebreak=1)],
            1,
            "cache_hit",
            id="session-breaks-near-tie",
        ),
        pytest.param([v(hit=N), v(hit=1024, session=True)], 0, "cache_hit", id="session-is-not-a-pin"),
        # ties break by the per-request hash, not by position
        pytest.param([v(hit=N, tiebreak=9), v(hit=N, tiebreak=3)], 1, "cache_hit", id="tie-by-hash"),
        # a prefix every engine holds: the least loaded of the near-equal engines takes it
        pytest.param(
            [v(hit=1024, load=6, tiebreak=0), v(hit=1024, load=2, tiebreak=9), v(hit=1024, load=4)],
            1,
            "cache_hit",
            id="near-equals-balance-by-load",
        ),
        # ... but load never buys out a real difference in cached prefix (1024 tokens ~ 45 ms)
        pytest.param(
            [v(hit=2048, load=3, running=3), v(hit=1024, load=1, running=1)],
            0,
            "cache_hit",
            id="balance-stays-inside-the-slack",
        ),
        # a session engine is more than the slack ahead of its peers: it stays, though busier
        pytest.param(
            [v(hit=N, load=3, session=True), v(hit=N, load=1)],
            0,
            "cache_hit",
            id="session-beats-balance",
        ),
    ],
)
def test_decide(views: list[CandidateView], expected: int, reason: str) -> None:
    choice = decide(N, views, S, random.Random(0))
    assert (choice.index, choice.reason) == (expected, reason)


@pytest.mark.parametrize(
    ("rate", "seed", "explored"),
    [(0.0, 0, 0), (1.0, 0, 200), (0.1, 1, 19)],
)
def test_exploration_rate_is_seeded(rate: float, seed: int, explored: int) -> None:
    s = CacheAwareSettings(explore_rate=rate)
    views = [v(hit=N), v(), v()]
    rng = random.Random(seed)
    picks = [decide(N, views, s, rng) for _ in range(200)]
    assert sum(c.reason == "explore" for c in picks) == explored
    again = random.Random(seed)
    assert picks == [decide(N, views, s, again) for _ in range(200)]
    if explored == 200:
        assert {c.index for c in picks} == {0, 1, 2}


def test_exploration_never_picks_a_skipped_engine() -> None:
    s = CacheAwareSettings(explore_rate=1.0)
    views = [v(load=20, running=20, queued=50_000), v(load=1), v(load=1)]
    rng = random.Random(3)
    assert {decide(N, views, s, rng).index for _ in range(100)} == {1, 2}


@pytest.mark.parametrize(
    ("fresh", "older", "waiting", "expected"),
    [
        (100, 5000, None, 5100),  # no scrape: local counts
        (100, 5000, 0, 100 + 5000),  # empty queue: at most one chunk (8192) left of the older ones
        (100, 50_000, 0, 100 + 8192),
        (0, 0, 3, 3 * 1024),  # waiting requests we did not send
        (0, 9000, 3, 9000),  # ours already account for them
    ],
)
def test_reconcile(fresh: float, older: float, waiting: float | None, expected: float) -> None:
    assert reconcile(fresh, older, waiting, chunk_tokens=8192, tokens_per_waiting=1024) == expected


def test_ledger_releases_on_done_and_at_the_deadline() -> None:
    led = PrefillLedger()
    led.add("r1", "a", 1000, now=0.0, deadline=5.0)
    led.add("r2", "a", 500, now=1.0, deadline=2.0)
    led.add("r3", "b", 700, now=1.0, deadline=9.0)
    assert (led.queued("a", 1.5, scraped_at=None, num_waiting=None), led.local("b")) == (1500, 700)
    assert led.queued("a", 3.0, scraped_at=None, num_waiting=None) == 1000  # r2 expired
    led.done("r1")
    led.done("r1")  # idempotent
    assert led.queued("a", 3.0, scraped_at=None, num_waiting=None) == 0
    assert len(led) == 1


def test_ledger_counts_dispatches_newer_than_the_scrape_in_full() -> None:
    led = PrefillLedger(chunk_tokens=100)
    led.add("old", "a", 5000, now=1.0, deadline=60.0)
    led.add("new", "a", 3000, now=3.0, deadline=60.0)
    # the scrape at t=2 saw an empty queue: `old` is prefilling, `new` it could not know
    assert led.queued("a", 4.0, scraped_at=2.0, num_waiting=0) == 3000 + 100


@pytest.mark.parametrize(
    ("started_at", "num_waiting", "expected"),
    [
        (None, 1, 1024.0),  # still waiting for all we know: one prompt's worth
        (3.0, 1, 0.0),  # ours, dispatched before the scrape, started after: it waits no more
        (1.5, 1, 1024.0),  # started before the scrape: the waiting one is someone else's
        (3.0, 2, 1024.0),  # one of the two still waits
    ],
)
def test_a_scraped_wait_stops_counting_our_requests_that_started_since(
    started_at: float | None, num_waiting: int, expected: float
) -> None:
    led = PrefillLedger(chunk_tokens=100, tokens_per_waiting=1024)
    led.add("r", "a", 50, now=1.0, deadline=60.0)
    if started_at is not None:
        led.done("r", started_at)
    else:
        led.done("r")  # released without a start time (an expiry): the scrape still speaks
    assert led.queued("a", 4.0, scraped_at=2.0, num_waiting=num_waiting) == expected


def test_exploration_is_off_by_default() -> None:
    # the index is exact: a random pick learns nothing and costs a cold prefill
    views = [v(hit=N), v(), v()]
    rng = random.Random(0)
    assert {decide(N, views, CacheAwareSettings(), rng).reason for _ in range(1000)} == {"cache_hit"}


@pytest.mark.parametrize(
    ("load_us", "compute_us", "failure", "expected"),
    [
        (0.0, 70.0, 0.0, 1.0),  # free and certain: as good as a GPU hit
        (7.0, 70.0, 0.0, 0.9),  # a tenth of the compute time
        (35.0, 70.0, 0.0, 0.5),
        (0.0, 70.0, 0.25, 0.75),  # a quarter never comes back: paid, then computed
        (70.0, 70.0, 0.0, 0.0),  # as slow as computing: saves nothing
        (330.0, 68.0, 0.43, 0.0),  # Redis on the H200 run: slower than computing, floored
        (4.0, 68.0, 0.0, pytest.approx(0.941, abs=1e-3)),  # LMCache's CPU tier on the H200 run
    ],
)
def test_tier_weight(load_us: float, compute_us: float, failure: float, expected: float) -> None:
    assert tier_weight(load_us, compute_us, failure) == expected


def test_tier_weight_needs_a_compute_cost() -> None:
    with pytest.raises(ValueError, match="compute_us_per_token"):
        tier_weight(1.0, 0.0)


def test_default_weights_are_the_measured_ones() -> None:
    s = IndexSettings()
    assert (s.cpu_weight, s.shared_weight) == (round(H200_CPU_WEIGHT, 2), round(H200_SHARED_WEIGHT, 2))
    assert s.shared_weight == 0.0


def shared_and_gpu(settings: IndexSettings) -> tuple[CandidateView, CandidateView]:
    """A 8,192-token prompt whose first 6,144 tokens sit in Redis (LMCache wrote them through from
    some engine); engine 0 also holds them on its GPU and is a little busier than engine 1."""
    bs = 16
    holder = PrefixMatch(bs, gpu_blocks=384, local_blocks=384, reachable_blocks=384)
    other = PrefixMatch(bs, gpu_blocks=0, local_blocks=0, reachable_blocks=384)
    return (
        v(hit=holder.hit_tokens(settings), queued=4096, running=8, load=9),
        v(hit=other.hit_tokens(settings), queued=0, running=4, load=5),
    )


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        # the old guess: a Redis hit worth 0.6 of a GPU hit left the GPU holder 40% of 6,144
        # tokens ahead, less than its queue: the request went where Redis had to be read
        ({"cpu_weight": 0.8, "shared_weight": 0.6}, 1),
        # measured: Redis is slower than computing, so only the GPU copy counts, and wins
        ({}, 0),
    ],
)
def test_a_redis_copy_no_longer_outweighs_a_gpu_hit(weights: dict[str, float], expected: int) -> None:
    settings = IndexSettings(**weights)  # type: ignore[arg-type]
    choice = decide(N, shared_and_gpu(settings), S, random.Random(0))
    assert choice.index == expected
