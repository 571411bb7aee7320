"""Open-loop pacing (``kvstack.bench.pacing``): the send schedule (pure), and the loop that follows it."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvstack.bench.pacing import open_loop, send_times


@pytest.mark.parametrize(
    ("rate", "start", "until", "expect"),
    [
        (4.0, 10.0, 11.0, [10.0, 10.25, 10.5, 10.75]),  # the end is not a send time
        (4.0, 10.0, 11.01, [10.0, 10.25, 10.5, 10.75, 11.0]),
        (0.5, 0.0, 5.0, [0.0, 2.0, 4.0]),
        (100.0, 3.0, 3.0, []),  # an empty window sends nothing
        (1.0, 3.0, 2.0, []),
    ],
)
def test_send_times_are_the_start_then_every_interval(
    rate: float, start: float, until: float, expect: list[float]
) -> None:
    assert list(send_times(rate, start, until)) == pytest.approx(expect)


def test_send_times_do_not_drift() -> None:
    """Due times are start + i / rate, not sums of intervals: no rounding error piles up."""
    times = list(send_times(3.0, 0.0, 10_000.0))
    assert len(times) == 30_000
    assert times[-1] == 29_999 * (1.0 / 3.0)


@pytest.mark.parametrize("rate", [0.0, -1.0])
def test_a_rate_that_is_not_positive_is_refused(rate: float) -> None:
    with pytest.raises(ValueError, match="rate must be positive"):
        list(send_times(rate, 0.0, 1.0))


async def test_the_loop_sends_each_request_once_and_waits_for_all() -> None:
    """Overdue requests (a start in the past) go at once; the loop returns only when every request
    it started has finished, each ``after_send`` after its request's start."""
    started: list[int] = []
    finished: list[int] = []
    after: list[int] = []
    gate = asyncio.Event()

    async def send(i: int) -> None:
        started.append(i)
        await gate.wait()  # none finishes before the last is sent: the loop does not wait on them
        finished.append(i)

    def after_send() -> None:
        after.append(len(after))
        if len(after) == 25:
            gate.set()

    now = time.perf_counter()
    sent = await open_loop(100.0, now - 0.2, now + 0.045, send, after_send)
    assert sent == len(list(send_times(100.0, now - 0.2, now + 0.045))) == 25
    assert started == list(range(25)) and after == list(range(25))
    assert sorted(finished) == list(range(25))
