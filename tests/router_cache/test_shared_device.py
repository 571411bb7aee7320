"""Engines sharing one device (several engines on a GPU): the slowdown a busy neighbour causes, and
the cache-aware choice that follows from it (pure; table-driven), then through the policy."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError
from tests.router_cache.test_policy import BS, MODEL, SYSTEM, chat, req, stored

from kvstack.router.engines import Endpoint, EngineState
from kvstack.router.kvindex.index import KVIndex
from kvstack.router.policies.cache_aware import CacheAwarePolicy
from kvstack.router.policies.cache_aware_decide import (
    CandidateView,
    decide,
    device_slowdown,
    est_ttft,
    woken_s,
)
from kvstack.router.policies.cache_aware_settings import CacheAwareSettings
from kvstack.router.policies.shared_device import device_loads, device_neighbours

# the device's time shared equally: the tables below price the slowdown as 2x with two busy
S = CacheAwareSettings(explore_rate=0.0, shared_device_speed=())
H200 = (0.65, 0.43, 0.325)  # four vLLM engines on one H200: speed with 2, 3, 4 busy, relative to alone
PROMPT, SYSTEM_HIT = 3000, 1000  # a user's first turn: the product's system prompt cached everywhere


@pytest.mark.parametrize(
    ("busy_others", "speeds", "expected"),
    [
        (0, (), 1.0),  # alone on its device, or a device of its own
        (1, (), 2.0),  # no measurements: the device's time shared equally
        (3, (), 4.0),
        (1, H200, 1 / 0.65),
        (3, H200, 1 / 0.325),
        (4, H200, 5 / (0.325 * 4)),  # past the table: the last entry's share, split further
        (2, (0.65,), 3 / (0.65 * 2)),
    ],
)
def test_device_slowdown(busy_others: int, speeds: tuple[float, ...], expected: float) -> None:
    assert device_slowdown(busy_others, speeds) == pytest.approx(expected)


def v(
    load: float = 0,
    device_busy: int = 0,
    queued: float = 0,
    hit: float = SYSTEM_HIT,
    neighbours: float = 0,
    device_load: float | None = None,
) -> CandidateView:
    return CandidateView(
        hit_tokens=hit,
        queued_tokens=queued,
        running=load,
        load=load,
        device_busy=device_busy,
        device_queued=neighbours,
        bound_load=device_load,
    )


@pytest.mark.parametrize(
    ("views", "expected"),
    [
        # one GPU per engine: the idle engines are as good, and the least loaded wins
        pytest.param([v(load=1), v(), v()], 1, id="own-devices-spread"),
        # one GPU for all: an idle engine would run the prefill at half speed beside the busy one,
        # and slow it; the busy engine batches it
        pytest.param([v(load=1), v(device_busy=1), v(device_busy=1)], 0, id="a-shared-device-packs"),
        # ... until the busy engine's queue costs more than the slowdown: 20,000 tokens ahead
        pytest.param(
            [v(load=2, queued=20_000, neighbours=0), v(device_busy=1), v(device_busy=1)],
            1,
            id="a-long-queue-spreads",
        ),
        # 5,000 queued there cost 0.15 s, less than the idle engine's slower prefill (0.06 s more)
        # and the 0.15 s that waking it adds to those 5,000 tokens, now prefilled at half speed
        pytest.param(
            [v(load=2, queued=5_000), v(device_busy=1, neighbours=5_000), v(device_busy=1, neighbours=5_000)],
            0,
            id="waking-an-engine-slows-its-neighbours-queue",
        ),
        pytest.param([v(load=2, queued=5_000), v(), v()], 1, id="own-devices-a-queue-spreads"),
        # every engine busy: the slowdown is the same everywhere, the least loaded wins again
        pytest.param(
            [v(load=3, device_busy=2), v(load=1, device_busy=2), v(load=2, device_busy=2)],
            1,
            id="all-busy-balance",
        ),
        # the engine holding the user's document wins though its neighbours slow it
        pytest.param(
            [v(device_busy=2, hit=PROMPT), v(load=1, device_busy=1), v(load=1, device_busy=1)],
            0,
            id="a-long-hit-beside-busy-neighbours",
        ),
    ],
)
def test_decide_on_a_shared_device(views: list[CandidateView], expected: int) -> None:
    assert decide(PROMPT, views, S, random.Random(0)).index == expected


@pytest.mark.parametrize(
    ("views", "expected"),
    [
        # a GPU each: 6 requests on the one holding only the system prompt is past the load bound
        # (mean 1.5 + 3): the new user goes to an idle engine
        pytest.param([v(load=6, queued=1_000), v(), v(), v()], 1, id="own-devices-bounded"),
        # one GPU for all: bounded by the device's load, every engine is at the mean; the idle ones
        # would prefill slower and slow the busy one, so the user joins it
        pytest.param(
            [v(load=6, queued=1_000, device_load=6)]
            + [v(device_busy=1, neighbours=1_000, device_load=6)] * 3,
            0,
            id="one-device-bounded-as-one",
        ),
        # two GPUs of two engines: the busy device is past the bound (6 > 3 + 3); the other's engines win
        pytest.param(
            [v(load=7, queued=1_000, device_load=7), v(device_busy=1, neighbours=1_000, device_load=7)]
            + [v(device_load=0)] * 2,
            2,
            id="two-devices-the-busy-one-bounded",
        ),
    ],
)
def test_the_load_bound_weighs_devices_not_engines(views: list[CandidateView], expected: int) -> None:
    s = CacheAwareSettings(explore_rate=0.0, shared_device_speed=H200)
    assert decide(PROMPT, views, s, random.Random(0)).index == expected


@pytest.mark.parametrize(
    ("devices", "loads", "expected"),
    [
        pytest.param([None, None], [1, 0], [None, None], id="own-devices"),
        pytest.param(["g", "g", "h", None], [1, 2, 4, 3], [3, 3, 4, None], id="mixed"),
    ],
)
def test_device_loads(devices: list[str | None], loads: list[int], expected: list[float | None]) -> None:
    engines = [engine(i, d, n) for i, (d, n) in enumerate(zip(devices, loads, strict=True))]
    assert device_loads(engines) == expected


def test_the_default_speed_is_the_h200_measurement() -> None:
    """Measured, not equal sharing: with 1/2, waking a second engine would never pay."""
    assert CacheAwareSettings().shared_device_speed == (0.65,)
    assert device_slowdown(1, CacheAwareSettings().shared_device_speed) == pytest.approx(1 / 0.65)


@pytest.mark.parametrize(
    ("view", "expected_s"),
    [
        (v(device_busy=1, neighbours=34_000), 1.0),  # their second of prefill now takes two
        (v(device_busy=2, neighbours=34_000), 1.0),  # two busy: from 1/2 to 1/3 of the device each
        (v(load=1, device_busy=1, neighbours=34_000), 0.0),  # already busy: nothing changes
        (v(device_busy=0, neighbours=0), 0.0),
    ],
)
def test_woken_s(view: CandidateView, expected_s: float) -> None:
    assert woken_s(view, S) == pytest.approx(expected_s)


def test_est_ttft_slows_the_prefill_not_the_base() -> None:
    alone, shared = est_ttft(PROMPT, v(), S), est_ttft(PROMPT, v(device_busy=1), S)
    assert shared - S.base_ttft_s == pytest.approx(2 * (alone - S.base_ttft_s))


@pytest.mark.parametrize(
    ("speeds", "field"),
    [((0.65, 0.7), "faster"), ((0.0,), "fraction"), ((1.2,), "fraction")],
)
def test_bad_speeds_are_refused_naming_the_field(speeds: tuple[float, ...], field: str) -> None:
    with pytest.raises(ValidationError, match=rf"shared_device_speed[\s\S]*{field}"):
        CacheAwareSettings(shared_device_speed=speeds)


def engine(i: int, device: str | None, in_flight: int = 0) -> EngineState:
    ep = Endpoint(url=f"http://e{i}", name=f"e{i}", models=frozenset({MODEL}), device=device)
    st = EngineState(endpoint=ep, models=ep.models, block_size=BS, num_gpu_blocks=10_000)
    st.in_flight = in_flight
    return st


@pytest.mark.parametrize(
    ("devices", "loads", "candidates", "expected"),
    [
        pytest.param([None, None], [1, 0], 2, [(0, 0), (0, 0)], id="own-devices"),
        pytest.param(["g", "g", "g"], [1, 0, 2], 3, [(1, 300), (2, 400), (1, 100)], id="one-device"),
        pytest.param(
            ["g", "g", "h", "h"], [1, 0, 0, 1], 4, [(0, 0), (1, 100), (1, 400), (0, 0)], id="two-devices"
        ),
        # the third engine is not a candidate (flow control left it out: no room) but is busy there
        pytest.param(["g", "g", "g"], [0, 0, 3], 2, [(1, 300), (1, 300)], id="a-busy-engine-not-a-candidate"),
        pytest.param(["g", None], [0, 1], 2, [(0, 0), (0, 0)], id="a-device-of-its-own-beside"),
    ],
)
def test_device_neighbours(
    devices: list[str | None], loads: list[int], candidates: int, expected: list[tuple[int, float]]
) -> None:
    engines = [engine(i, d, n) for i, (d, n) in enumerate(zip(devices, loads, strict=True))]
    queued = {st.url: 100.0 * (i + 1) for i, st in enumerate(engines)}  # engine i: 100 (i + 1) tokens
    assert device_neighbours(engines[:candidates], engines, lambda st: queued[st.url]) == expected


@pytest.mark.parametrize(("device", "packed"), [("gpu-0", True), (None, False)])
def test_the_policy_packs_new_users_on_the_busy_engine_of_a_shared_device(
    device: str | None, packed: bool
) -> None:
    """Four engines hold the system prompt; one is serving six requests, past the bound of one
    engine among four (mean 1.5 + 3). On one GPU the next new user joins it there, bounded by the
    device's load; with a GPU each it goes to an idle engine."""
    cands = [engine(i, device, in_flight=6 if i == 2 else 0) for i in range(4)]
    index = KVIndex()
    system = chat(SYSTEM, "")
    for st in cands:
        index.ensure_engine(st.url, model=MODEL, block_size=BS)
        index.apply(st.url, [stored(system)])
    policy = CacheAwarePolicy(index, CacheAwareSettings(seed=0, explore_rate=0.0))
    for user in range(8):
        decision = policy.choose(req(chat(SYSTEM, f"user {user}: " + "a long document " * 200)), cands, 0.0)
        assert (decision.engine.url == "http://e2") is packed, decision
