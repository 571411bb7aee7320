"""What an engine says its requests wait (its queue-time histogram) and how much a shared device's
neighbours weigh in the load bound: the pure pieces (tables), the monitor reading two real scrape
texts, and the cache-aware choice on the H100 pile-up of bench-results/lmcache section 18."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvstack.router.engines import Endpoint, EngineState
from kvstack.router.monitor import apply_metrics, clear_metrics
from kvstack.router.policies.cache_aware_decide import CandidateView, decide, est_ttft
from kvstack.router.policies.cache_aware_settings import CacheAwareSettings
from kvstack.router.policies.shared_device import device_loads, sharing
from kvstack.router.queue_wait import QUEUE_COUNT, QUEUE_SUM, queue_wait_s
from kvstack.router.scrape import parse_vllm_metrics

REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "vllm-0.24-metrics.txt"


def counters(total_s: float, count: float) -> dict[str, float]:
    return {QUEUE_SUM: total_s, QUEUE_COUNT: count}


@pytest.mark.parametrize(
    ("before", "after", "waiting", "last", "expected"),
    [
        pytest.param(counters(10, 100), counters(16, 103), 0, 0.0, 2.0, id="three-scheduled-waited-2s-each"),
        pytest.param(counters(10, 100), counters(10, 100), 4, 2.0, 2.0, id="none-scheduled-still-waiting"),
        pytest.param(counters(10, 100), counters(10, 100), 0, 2.0, 0.0, id="none-scheduled-none-waiting"),
        pytest.param({}, counters(10, 100), 0, 0.0, 0.0, id="first-scrape"),
        pytest.param({}, {}, 3, 1.5, 1.5, id="no-histogram-exported"),
        pytest.param(counters(10, 100), counters(1, 2), 0, 3.0, 0.0, id="engine-restarted"),
        pytest.param(counters(10, 100), counters(10.5, 110), 2, 4.0, 0.05, id="the-queue-moved"),
    ],
)
def test_queue_wait(
    before: dict[str, float], after: dict[str, float], waiting: float, last: float, expected: float
) -> None:
    assert queue_wait_s(before, after, waiting, last) == pytest.approx(expected)


def test_the_monitor_reads_the_wait_from_two_real_scrapes() -> None:
    """vLLM 0.24's own exposition text (tests/reference): the histogram's sum and count are read,
    and the wait is the growth of one over the growth of the other."""
    text = REFERENCE.read_text()
    first = parse_vllm_metrics(text)
    assert first.counters[QUEUE_COUNT] == 249.0
    later = text.replace(
        'vllm:request_queue_time_seconds_count{engine="0",model_name="dummy-8b"} 249.0',
        'vllm:request_queue_time_seconds_count{engine="0",model_name="dummy-8b"} 253.0',
    ).replace(
        'vllm:request_queue_time_seconds_sum{engine="0",model_name="dummy-8b"} 36.911650254000165',
        'vllm:request_queue_time_seconds_sum{engine="0",model_name="dummy-8b"} 46.911650254000165',
    )
    assert later != text
    state = EngineState(Endpoint(url="http://e", name="e"))
    apply_metrics(state, first, now=1.0)
    assert state.queue_wait_s == 0.0  # one scrape says nothing about the wait of late
    apply_metrics(state, parse_vllm_metrics(later), now=2.0)
    assert state.queue_wait_s == pytest.approx(10.0 / 4)
    clear_metrics(state)
    assert state.queue_wait_s == 0.0


S = CacheAwareSettings(explore_rate=0.0)
PROMPT = 7_300  # a warm turn of the multi-round chat: ~7K tokens of history


def test_the_engines_wait_is_a_floor_for_its_queue() -> None:
    warm = CandidateView(hit_tokens=7_000, queued_tokens=0, running=6, load=20)
    waiting = warm._replace(queue_wait_s=2.8)
    assert est_ttft(PROMPT, waiting, S) == pytest.approx(S.base_ttft_s + 2.8 + 300 / S.prefill_tokens_per_s)
    # a modelled queue longer than the reported wait stands
    long = warm._replace(queued_tokens=200_000, queue_wait_s=0.5)
    assert est_ttft(PROMPT, long, S) == est_ttft(PROMPT, long._replace(queue_wait_s=0.0), S)


@pytest.mark.parametrize(
    ("wait_s", "expected"),
    [
        pytest.param(0.0, 0, id="no-wait-the-holder-wins"),
        # 19 warm turns arrived together behind LMCache's stores: 2.8 s each on the H100; the
        # other engine holds the history in Redis (0.9 s to load) and prefills the rest
        pytest.param(2.8, 1, id="a-2.8s-wait-the-redis-load-wins"),
    ],
)
def test_a_reported_wait_moves_a_warm_turn(wait_s: float, expected: int) -> None:
    holder = CandidateView(hit_tokens=7_000, queued_tokens=0, running=6, load=20, queue_wait_s=wait_s)
    other = CandidateView(hit_tokens=7_000, queued_tokens=0, running=0, load=0, load_s=0.9)
    assert decide(PROMPT, [holder, other], S, random.Random(0)).index == expected


@pytest.mark.parametrize(
    ("speeds", "expected"),
    [
        pytest.param((), 1.0, id="unmeasured-equal-split"),
        pytest.param((0.5,), 1.0, id="one-compute"),
        pytest.param((0.65,), 1 / 0.65 - 1, id="h200-prior"),
        pytest.param((0.95,), 1 / 0.95 - 1, id="h100-lmcache-measured"),
        pytest.param((1.1,), 0.0, id="faster-together-is-no-device-at-all"),
        pytest.param((0.3, 0.2), 1.0, id="worse-than-equal-is-capped"),
    ],
)
def test_sharing(speeds: tuple[float, ...], expected: float) -> None:
    assert sharing(speeds) == pytest.approx(expected)


def engine(i: int, device: str | None, load: int) -> EngineState:
    st = EngineState(Endpoint(url=f"http://e{i}", name=f"e{i}", device=device))
    st.in_flight = load
    return st


@pytest.mark.parametrize(
    ("share", "expected"),
    [
        pytest.param(1.0, [16.0, 16.0, None], id="one-compute-the-device-load"),
        pytest.param(0.0, [16.0, 0.0, None], id="independent-each-engine-own"),
        pytest.param(0.5, [16.0, 8.0, None], id="between"),
    ],
)
def test_device_loads_weigh_neighbours_by_sharing(share: float, expected: list[float | None]) -> None:
    engines = [engine(0, "gpu-0", 16), engine(1, "gpu-0", 0), engine(2, None, 3)]
    assert device_loads(engines, lambda device: share) == expected


def pile_up(speeds: tuple[float, ...]) -> int:
    """The H100's pile-up (section 18): one engine holds 16 sessions, the idle one beside it on the
    same GPU; a new user (the 2,176-token system prompt cached on the holder only, the same in
    Redis for the other) arrives. The holder's queue is short, so only the load bound can move it."""
    holder, idle = engine(0, "gpu-0", 16), engine(1, "gpu-0", 0)
    share = sharing(speeds)
    loads = device_loads([holder, idle], lambda device: share)
    views = [
        CandidateView(2_176, 0, 16, 16, bound_load=loads[0]),
        CandidateView(0, 0, 0, 0, load_s=0.27, device_busy=1, bound_load=loads[1], speeds=speeds),
    ]
    return decide(6_750, views, CacheAwareSettings(explore_rate=0.0), random.Random(0)).index


def test_engines_that_barely_slow_each_other_are_bounded_apart() -> None:
    """Measured at 0.95 of their speed alone (as two LMCache engines on the H100 were), the bound
    sees 16 requests against ~1 and the new user goes to the idle engine; as one compute (0.5),
    the device is at its mean and the user joins the holder, as on the simulated H200."""
    assert pile_up((0.95,)) == 1
    assert pile_up((0.5,)) == 0
