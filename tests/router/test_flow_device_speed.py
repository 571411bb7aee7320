"""A shared device's slowdown, learnt: per number of engines busy there, rate samples against the
engine alone (router/flow/device_speed.py). The cost model's use of it is tested in
tests/router_cache/test_learnt_rate.py."""

from __future__ import annotations

import time

import pytest

from kvstack.router.engines import Endpoint, EngineRegistry, EngineState
from kvstack.router.flow.config import FlowControlConfig
from kvstack.router.flow.controller import FlowControl
from kvstack.router.flow.device_speed import MIN_SAMPLES, Bucket, observe, speeds
from kvstack.router.flow.grant import Grant
from kvstack.router.flow.ledger import Prefill
from kvstack.router.metrics import RouterMetrics
from kvstack.router.policies.shared_device import busy_on_device

M = "m"
PRIOR = (0.65,)
N = MIN_SAMPLES


def b(rate: float, samples: int = N) -> Bucket:
    return Bucket(rate, samples)


@pytest.mark.parametrize(
    ("buckets", "expected"),
    [
        pytest.param({}, PRIOR, id="nothing-learnt-the-prior"),
        pytest.param({1: b(20_000), 2: b(19_000, N - 1)}, PRIOR, id="too-few-shared-samples"),
        pytest.param({1: b(20_000, N - 1), 2: b(19_000)}, PRIOR, id="alone-not-measured"),
        # the H100's two eager LMCache engines (bench-results/lmcache section 17)
        pytest.param({1: b(20_000), 2: b(19_000)}, (0.95,), id="h100-two-busy-keep-their-speed"),
        pytest.param({1: b(20_000), 2: b(10_000)}, (0.5,), id="time-sliced-halves"),
        pytest.param({1: b(20_000), 2: b(30_000)}, (1.0,), id="never-faster-than-alone"),
        pytest.param({1: b(20_000), 2: b(1)}, (0.05,), id="floored"),
        # three busy measured, two not: the prior for two, never below three's
        pytest.param({1: b(20_000), 3: b(16_000)}, (0.65, 0.65), id="three-busy-capped-by-two"),
        pytest.param({1: b(20_000), 3: b(8_000)}, (0.65, 0.4), id="three-busy-measured"),
    ],
)
def test_speeds(buckets: dict[int, Bucket], expected: tuple[float, ...]) -> None:
    assert speeds(buckets, PRIOR) == pytest.approx(expected)


def test_observe_keeps_an_ewma_per_number_busy() -> None:
    buckets = observe({}, 2, 10_000.0)
    assert buckets == {2: Bucket(10_000.0, 1)}
    buckets = observe(buckets, 2, 20_000.0)
    assert buckets[2].samples == 2 and buckets[2].rate == pytest.approx(11_000.0)
    assert observe(buckets, 0, 5.0)[1] == Bucket(5.0, 1)  # none busy counts as alone


def make(devices: list[str | None]) -> tuple[FlowControl, list[EngineState]]:
    registry = EngineRegistry()
    registry.sync(
        [Endpoint(f"http://e{i}", f"e{i}", frozenset({M}), device=d) for i, d in enumerate(devices)]
    )
    metrics = RouterMetrics(registry, time.monotonic, [M])
    control = FlowControl(
        FlowControlConfig(),
        registry,
        metrics,
        lambda: 0.0,
        max_in_flight=None,
        queue_timeout_s=5.0,
        tick_s=60.0,
    )
    return control, registry.all()


@pytest.mark.parametrize(
    ("devices", "in_flight", "expected"),
    [
        ([None, None], [1, 1], 1),  # devices of their own
        (["g", "g", "g"], [0, 0, 0], 1),
        (["g", "g", "g"], [0, 3, 0], 2),
        (["g", "g", "g"], [5, 3, 1], 3),  # itself busy too: counted once
        (["g", "h", "g"], [0, 3, 0], 1),  # a busy engine on another device
    ],
)
def test_busy_on_device(devices: list[str | None], in_flight: list[int], expected: int) -> None:
    _, engines = make(devices)
    for e, n in zip(engines, in_flight, strict=True):
        e.in_flight = n
    assert busy_on_device(engines[0], engines) == expected


def test_a_neighbour_busy_by_its_own_count_is_busy_as_the_decision_counts_it() -> None:
    """Requests another router sent there show in the engine's scrape, not in ``in_flight``: the
    learner counts them as the cost model's ``device_busy`` does (one measure, shared_device.busy)."""
    _, engines = make(["g", "g"])
    engines[1].num_waiting = 2
    assert busy_on_device(engines[0], engines) == 2


def prefill(control: FlowControl, engine: EngineState, rate: float, busy: int, count: int = N) -> None:
    """``count`` prefills at ``engine`` at ``rate`` tokens/s, each sent with ``busy`` engines busy."""
    ledger = control.room.ledger(engine)
    for grant_id in range(count):
        ledger.prefill[grant_id] = Prefill(tokens=10_000, due=0.0, streamed=True)
        control.room.prefill_done(engine, grant_id, 10_000, 10_000 / rate, busy=busy)


def test_the_room_learns_its_devices_speed_and_prices_at_the_rate_alone() -> None:
    control, (e0, e1) = make(["g", "g"])
    assert control.room.device_speeds("g", PRIOR) == PRIOR
    prefill(control, e0, 20_000.0, busy=1)
    assert control.room.device_speeds("g", PRIOR) == PRIOR  # nothing shared yet
    prefill(control, e1, 18_000.0, busy=2)
    assert control.room.device_speeds("g", PRIOR) == pytest.approx((0.9,), rel=0.02)
    # priced at the rate alone (the engine's own rate mixes both, and the slowdown comes on top)
    assert control.room.pricing_rate(e1) == pytest.approx(20_000.0, rel=0.02)


def test_a_device_whose_engines_left_forgets_its_speed() -> None:
    control, (e0, _) = make(["g", "g"])
    prefill(control, e0, 20_000.0, busy=1)
    control.registry.sync([])
    control.room.forget_gone(control.registry)
    assert control.room.device_buckets == {}


def test_a_dispatch_records_how_many_engines_were_busy_on_the_device() -> None:
    control, (e0, e1) = make(["g", "g"])
    e1.in_flight = 2
    grant = Grant(
        id=7,
        model=M,
        class_name="default",
        priority=0,
        tenant="t",
        tenant_label="t",
        objective_s=None,
        cost=1.0,
    )
    control.dispatched(grant, e0, uncached=1_000.0, streamed=True)
    assert grant.device_busy == 2
