"""Flow control over engines that share a device (several engines time-slicing one GPU): an engine
not yet measured prefills at its device's learnt rate, and an engine saturated by its compute still
takes requests while another engine on its device has room (the cache-aware estimate chooses)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from kvstack.router.engines import Endpoint, EngineRegistry, EngineState
from kvstack.router.flow.config import FlowControlConfig
from kvstack.router.flow.controller import FlowControl
from kvstack.router.flow.ledger import Prefill
from kvstack.router.flow.room import STUCK_STREAM_S, device_paced
from kvstack.router.flow.saturation import Reason, Verdict
from kvstack.router.metrics import RouterMetrics

M = "m"


def make(devices: list[str | None], clock: list[float]) -> tuple[FlowControl, list[EngineState]]:
    registry = EngineRegistry()
    registry.sync(
        [Endpoint(f"http://e{i}", f"e{i}", frozenset({M}), device=d) for i, d in enumerate(devices)]
    )
    metrics = RouterMetrics(registry, time.monotonic, [M])
    config = FlowControlConfig()
    control = FlowControl(
        config, registry, metrics, lambda: clock[0], max_in_flight=None, queue_timeout_s=5.0, tick_s=60.0
    )
    return control, registry.all()


def learn(control: FlowControl, engine: EngineState, rate: float) -> None:
    """Prefills at ``engine`` that took their tokens at ``rate``: three far off the default, so
    the learnt rate jumps to them (saturation.learn_rate)."""
    ledger = control.room.ledger(engine)
    for grant_id in range(3):
        ledger.prefill[grant_id] = Prefill(tokens=10_000, due=0.0, streamed=True)
        control.room.prefill_done(engine, grant_id, 10_000, 10_000 / rate)


@pytest.mark.parametrize(
    ("devices", "measured", "expected"),
    [
        pytest.param(["g", "g"], {0: 9_000.0}, 9_000.0, id="a-neighbour-measured"),
        pytest.param(["g", "g", "g"], {0: 9_000.0, 2: 2_000.0}, 5_500.0, id="their-mean"),
        pytest.param(["g", "h"], {0: 9_000.0}, 34_000.0, id="another-device-the-default"),
        pytest.param([None, None], {0: 9_000.0}, 34_000.0, id="own-devices-the-default"),
        pytest.param(["g", "g"], {0: 9_000.0, 1: 30_000.0}, 30_000.0, id="measured-its-own"),
    ],
)
def test_an_unmeasured_engine_prefills_at_its_devices_rate(
    devices: list[str | None], measured: dict[int, float], expected: float
) -> None:
    control, engines = make(devices, [0.0])
    for i, rate in measured.items():
        learn(control, engines[i], rate)
    assert control.room.rate(engines[1]) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize(
    ("reason", "device", "roomy", "kv_usage", "paced"),
    [
        ("prefill_backlog", "g", {"g"}, 0.3, True),
        ("overdue", "g", {"g"}, 0.3, True),
        ("overdue", "g", {"h"}, 0.3, False),  # every engine on its device is saturated: wait
        ("overdue", None, {"g"}, 0.3, False),  # a device of its own
        ("overdue", "g", {"g"}, 0.93, False),  # late for KV, not compute: its KV is its own
        ("prefill_backlog", "g", {"g"}, None, False),  # its KV not scraped yet
        ("kv_usage", "g", {"g"}, 0.96, False),
        ("full", "g", {"g"}, 0.3, False),  # and so are its batch slots
    ],
)
def test_device_paced(
    reason: Reason, device: str | None, roomy: set[str], kv_usage: float | None, paced: bool
) -> None:
    endpoint = Endpoint("http://e0", "e0", frozenset({M}), device=device)
    engine = EngineState(endpoint=endpoint, models=endpoint.models)
    engine.kv_cache_usage = kv_usage
    assert device_paced(engine, {"http://e0": Verdict(True, reason)}, roomy) is paced


@pytest.mark.parametrize(("devices", "expected"), [(["g", "g"], ["e0", "e1"]), ([None, None], ["e1"])])
async def test_an_engine_behind_its_backlog_keeps_taking_requests_while_its_device_has_room(
    devices: list[str | None], expected: list[str]
) -> None:
    """e0 is saturated by the 9,000 tokens sent to it (0.25 s at 34K/s is 8,500); e1 is idle. On one
    GPU both stay candidates (the cache-aware estimate prices waking e1); with a GPU each, e1."""
    clock = [0.0]
    control, (e0, e1) = make(devices, clock)
    cls = control.config.class_named("default")
    assert cls is not None
    busy = await control.admit(M, "t", cls, 9_000, [e0, e1])
    e0.kv_cache_usage = 0.2
    e0.in_flight += 1
    control.dispatched(busy, e0, 9_000, streamed=True)
    assert [e.name for e in control.with_room([e0, e1])] == expected


async def test_a_stream_late_on_a_shared_gpu_leaves_no_engine_of_it_with_room() -> None:
    """Four engines of one H200 past capacity: three late, the fourth idle (the cache-aware estimate
    never woke it). Its idle room admitted every request, 0 % refused at twice the capacity
    (bench-results/flow, "Four LMCache engines on an H200"); now the next request queues until an
    engine with work there has room again."""
    clock = [0.0]
    control, engines = make(["g", "g", "g", "g"], clock)
    cls = control.config.class_named("default")
    assert cls is not None
    for engine in engines:
        engine.kv_cache_usage = 0.3
    grants = []
    for engine in engines[:3]:
        grant = await control.admit(M, "t", cls, 2_000, engines)
        engine.in_flight += 1
        control.dispatched(grant, engine, 2_000, streamed=True)
        grants.append(grant)
    assert control.room_for(M, engines, clock[0], cls.priority) == 4  # on time: every engine has room
    clock[0] = 5.0  # their first tokens are past due: the GPU is behind
    verdicts = control.room.verdicts(engines, control.room.limits, clock[0])
    assert [v.reason for v in verdicts] == ["overdue", "overdue", "overdue", "device_busy"]
    assert control.room_for(M, engines, clock[0], cls.priority) == 0
    waiter = asyncio.get_running_loop().create_task(control.admit(M, "t", cls, 2_000, engines))
    await asyncio.sleep(0.01)
    assert not waiter.done() and len(control.queue_for(M)) == 1
    control.first_token(grants[0], 4.0)  # e0 on time again, with room: the turn is the waiter's
    control.pump(M)
    grant = await asyncio.wait_for(waiter, 1)
    assert grant.queue_wait_s is not None and grant.queue_wait_s >= 0


@pytest.mark.parametrize(("late_by", "idle_one"), [(5.0, "device_busy"), (STUCK_STREAM_S + 1, "idle")])
async def test_a_stream_stuck_on_its_engine_keeps_no_neighbour_idle(late_by: float, idle_one: str) -> None:
    """A stream a minute past due is stuck on its engine (hung, /health still answering), not
    slowed by the GPU: its neighbour takes requests again."""
    clock = [0.0]
    control, (e0, e1) = make(["g", "g"], clock)
    cls = control.config.class_named("default")
    assert cls is not None
    e0.kv_cache_usage = e1.kv_cache_usage = 0.3
    grant = await control.admit(M, "t", cls, 2_000, [e0, e1])
    e0.in_flight += 1
    control.dispatched(grant, e0, 2_000, streamed=True)
    due = control.room.ledger(e0).prefill[grant.id].due
    clock[0] = due + late_by
    verdicts = control.room.verdicts([e0, e1], control.room.limits, clock[0])
    assert [v.reason for v in verdicts] == ["overdue", idle_one]


def test_a_device_s_mean_rate_follows_its_engines_leaving_and_moving() -> None:
    """The mean an unmeasured engine takes is kept where rates are learnt (no scan of every ledger
    per saturation check): an engine that left, or moved to another device, no longer counts."""
    control, (e0, e1, e2) = make(["g", "g", "g"], [0.0])
    learn(control, e0, 9_000.0)
    learn(control, e1, 3_000.0)
    assert control.room.rate(e2) == pytest.approx(6_000.0, rel=0.01)
    control.registry.sync([e1.endpoint, e2.endpoint])  # e0 left
    control.room.forget_gone(control.registry)
    assert control.room.rate(e2) == pytest.approx(3_000.0, rel=0.01)
    e1.endpoint = dataclasses.replace(e1.endpoint, device="h")  # e1 now on another GPU
    control.room.ledger(e1)
    assert control.room.rate(e2) == pytest.approx(34_000.0)  # nothing measured on g any more
    assert control.room.device_rates == {"h": {"http://e1": pytest.approx(3_000.0, rel=0.01)}}
