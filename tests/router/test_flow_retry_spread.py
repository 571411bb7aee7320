"""Refused requests are told to come back one after another, not together: the return schedule
(pure; table-driven), then a burst of refusals through the controller."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from tests.router.test_flow_controller import M, cls, make

from kvstack.router.exchange import RetryLater
from kvstack.router.flow.retry_spread import Return, ReturnSchedule, schedule_return


@pytest.mark.parametrize(
    ("now", "wait", "cost", "next_free", "expected"),
    [
        (10.0, 1.0, 0.2, 0.0, Return(1.0, 11.2)),  # an empty schedule: its own wait, then its prefill
        (10.0, 1.0, 0.2, 11.2, Return(1.2, 11.4)),  # the next in a burst: after the first's prefill
        (10.0, 3.0, 0.2, 11.2, Return(3.0, 13.2)),  # its own wait is later than the next free return
        (10.0, 1.0, 0.0, 11.2, Return(1.2, 11.2)),  # nothing to prefill: it books no time
        (10.0, 1.0, 0.2, 75.0, Return(60.0, 75.0)),  # past the cap: told the cap, books nothing
    ],
)
def test_schedule_return(now: float, wait: float, cost: float, next_free: float, expected: Return) -> None:
    got = schedule_return(now, wait, cost, next_free, max_s=60.0)
    assert got.retry_after_s == pytest.approx(expected.retry_after_s)
    assert got.next_free == pytest.approx(expected.next_free)


def test_each_model_keeps_its_own_schedule() -> None:
    schedule = ReturnSchedule(max_s=60.0)
    assert [schedule.tell("a", 0.0, 1.0, 0.5) for _ in range(3)] == [1.0, 1.5, 2.0]
    assert schedule.tell("b", 0.0, 1.0, 0.5) == 1.0
    assert schedule.tell("a", 10.0, 1.0, 0.5) == 1.0  # the burst's returns are past


async def refused_burst(spread: bool, cost: int = 20_000) -> tuple[list[float], float]:
    """Three requests of ``cost`` tokens refused at one instant by a full queue: the waits they were
    told, and the engines' prefill rate."""
    control, registry, _ = make(models=[{"max_queue": 1}], clock=lambda: 100.0, spread_retries=spread)
    engine = registry.all()[0]
    first = await control.admit(M, "t", cls(control), 100, registry.all())
    engine.in_flight += 1
    control.dispatched(first, engine, first.cost, streamed=False)
    task = asyncio.create_task(control.admit(M, "t", cls(control), 100, registry.all()))  # fills the queue
    await asyncio.sleep(0)
    told = []
    for _ in range(3):
        with pytest.raises(RetryLater) as refused:
            await control.admit(M, "t", cls(control), cost, registry.all())
        assert refused.value.status == 429
        told.append(refused.value.retry_after)
    task.cancel()
    return told, control.forecast.capacity(M, registry.all(), 100.0, False).prefill_tokens_per_s


async def test_a_burst_of_refusals_is_told_to_come_back_one_after_another() -> None:
    """Each is told to return after the one before it has had its prefill's time on the engine."""
    told, rate = await refused_burst(spread=True, cost=20_000)
    gaps = [b - a for a, b in itertools.pairwise(told)]
    assert gaps == pytest.approx([20_000 / rate] * 2)


async def test_with_spreading_off_a_burst_is_told_one_wait() -> None:
    told, _ = await refused_burst(spread=False)
    assert len(set(told)) == 1
