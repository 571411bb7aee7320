"""Flow control's saturation decisions, table by table: when an engine has room, the headroom kept
for higher classes, and the rates and slots learnt from the engines."""

from __future__ import annotations

from collections import deque

import pytest

from kvstack.router.flow.saturation import (
    EngineLoad,
    Limits,
    Verdict,
    class_share,
    device_busy,
    learn_rate,
    learn_slots,
    rate_sample,
    reserved_engines,
    saturation,
    waits_for_slot,
)

RATE = 34_000.0
LIMITS = Limits(prefill_target_s=0.25, max_kv_usage=0.95, max_waiting=0, max_in_flight=None)


@pytest.mark.parametrize(
    ("load", "limits", "saturated", "reason"),
    [
        # nothing of ours there: it always takes one, whatever it reports (the queue drains)
        (EngineLoad(0, 0, RATE, num_waiting=9, kv_usage=1.0), LIMITS, False, "idle"),
        (EngineLoad(3, 1000, RATE, num_waiting=0, kv_usage=0.5), LIMITS, False, "room"),
        (EngineLoad(3, 1000, RATE), LIMITS, False, "room"),  # not scraped yet: our own ledger decides
        (EngineLoad(3, 1000, RATE, num_waiting=1), LIMITS, True, "waiting"),  # no stream to tell by
        (EngineLoad(3, 1000, RATE, num_waiting=1, queueing=True), LIMITS, True, "overdue"),
        (EngineLoad(3, 1000, RATE, num_waiting=0, queueing=True), LIMITS, True, "overdue"),  # before a scrape
        # a scrape caught a request between two steps, but our streams get their tokens on time
        (EngineLoad(3, 1000, RATE, num_waiting=1, queueing=False), LIMITS, False, "room"),
        (EngineLoad(3, 1000, RATE, num_waiting=2), Limits(0.25, max_waiting=2), False, "room"),
        (EngineLoad(3, 1000, RATE, kv_usage=0.95), LIMITS, True, "kv_usage"),
        (EngineLoad(3, 1000, RATE, kv_usage=0.94), LIMITS, False, "room"),
        # 0.25 s of prefill at 34K tokens/s is 8,500 tokens
        (EngineLoad(3, 8_499, RATE), LIMITS, False, "room"),
        (EngineLoad(3, 8_500, RATE), LIMITS, True, "prefill_backlog"),
        (EngineLoad(3, 8_500, 2 * RATE), LIMITS, False, "room"),  # a faster engine takes more
        (EngineLoad(2, 0, RATE), Limits(0.25, max_in_flight=2), True, "in_flight_cap"),
        (EngineLoad(8, 0, RATE, slots=8), LIMITS, True, "full"),  # its learnt batch is full
        (EngineLoad(7, 0, RATE, slots=8), LIMITS, False, "room"),
        (EngineLoad(8, 0, RATE, slots=8), Limits(0.25, max_waiting=1), False, "room"),
        (EngineLoad(1, 0, RATE), Limits(0.25, max_in_flight=2), False, "room"),
        # the hard cap first, then the engine's queue, then KV, then the backlog
        (EngineLoad(2, 9e9, RATE, 5, 1.0), Limits(0.25, max_in_flight=2), True, "in_flight_cap"),
        (EngineLoad(1, 9e9, RATE, 5, 1.0), LIMITS, True, "waiting"),
        (EngineLoad(1, 9e9, RATE, 0, 1.0), LIMITS, True, "kv_usage"),
        # a lower class's share (headroom for a higher class): half the batch and half the backlog
        (EngineLoad(4, 0, RATE, slots=8), Limits(0.25, share=0.5), True, "full"),
        (EngineLoad(3, 0, RATE, slots=8), Limits(0.25, share=0.5), False, "room"),
        (EngineLoad(3, 4_250, RATE), Limits(0.25, share=0.5), True, "prefill_backlog"),
        (EngineLoad(3, 4_249, RATE), Limits(0.25, share=0.5), False, "room"),
        (EngineLoad(0, 9e9, RATE, slots=8), Limits(0.25, share=0.5), False, "idle"),  # it always progresses
        # kept clear for a higher class: even idle, before every other rule
        (EngineLoad(0, 0, RATE, reserved=True), Limits(0.25, share=0.5), True, "reserved"),
        (EngineLoad(3, 9e9, RATE, 5, 1.0, reserved=True), LIMITS, True, "reserved"),
    ],
)
def test_saturation(load: EngineLoad, limits: Limits, saturated: bool, reason: str) -> None:
    verdict = saturation(load, limits)
    assert (verdict.saturated, verdict.reason) == (saturated, reason)


ROOM, IDLE, LATE = Verdict(False, "room"), Verdict(False, "idle"), Verdict(True, "overdue")
BUSY, BACKLOG = Verdict(True, "device_busy"), Verdict(True, "prefill_backlog")


@pytest.mark.parametrize(
    ("verdicts", "devices", "late", "expected"),
    [
        # the H200 case: three engines of one GPU late, the fourth idle and never chosen
        ([LATE, LATE, LATE, IDLE], ["g"] * 4, [True] * 4, [LATE, LATE, LATE, BUSY]),
        ([LATE, ROOM, IDLE], ["g"] * 3, [True] * 3, [LATE, ROOM, BUSY]),  # one with work keeps its room
        ([LATE, IDLE], ["g", "h"], [True, True], [LATE, IDLE]),  # another GPU has its own compute
        ([LATE, IDLE], [None, None], [True, True], [LATE, IDLE]),  # a GPU each
        ([LATE, IDLE], ["g", "g"], [False, True], [LATE, IDLE]),  # late for KV, or stuck: its own
        ([BACKLOG, IDLE], ["g", "g"], [True, True], [BACKLOG, IDLE]),  # a forecast, not a late stream
        ([LATE, BACKLOG, IDLE], ["g", "g", "h"], [True] * 3, [LATE, BACKLOG, IDLE]),
        ([], [], [], []),
    ],
)
def test_device_busy(
    verdicts: list[Verdict], devices: list[str | None], late: list[bool], expected: list[Verdict]
) -> None:
    assert device_busy(verdicts, devices, late) == expected


@pytest.mark.parametrize(
    ("priority", "top_active", "share"),
    [
        (0, None, 1.0),  # no class seen lately: the whole engine (work-conserving)
        (0, 0, 1.0),  # only its own class about
        (10, 0, 1.0),  # a higher class than any seen
        (10, 10, 1.0),
        (0, 10, 0.5),  # a higher class about: the lower one leaves it headroom
        (5, 10, 0.5),
    ],
)
def test_class_share(priority: int, top_active: int | None, share: float) -> None:
    assert class_share(priority, top_active, 0.5) == share


@pytest.mark.parametrize(
    ("held", "share", "reserved"),
    [
        # no higher class about (share 1): nothing is kept clear, whatever the lower class holds
        ([True, True, True, True], 1.0, [False] * 4),
        ([False] * 4, 1.0, [False] * 4),
        # half of four engines: the lower class may take a second engine ...
        ([True, False, False, False], 0.5, [False] * 4),
        # ... and holding two, the other two are the higher class's
        ([True, True, False, False], 0.5, [False, False, True, True]),
        ([False, True, False, True], 0.5, [True, False, True, False]),
        # it holds more than its share (it was there before the higher class came): nothing new
        ([True, True, True, False], 0.5, [False, False, False, True]),
        ([True, True, True, True], 0.5, [False] * 4),
        # at least one engine, however small the share or the model: the lower class progresses
        ([False, False, False, False], 0.1, [False] * 4),
        ([True, False, False, False], 0.1, [False, True, True, True]),
        ([True], 0.5, [False]),
        ([False], 0.5, [False]),
        ([True, False, False], 0.75, [False] * 3),  # floor(2.25): two engines
        ([True, True, False], 0.75, [False, False, True]),
        ([], 0.5, []),
    ],
)
def test_reserved_engines(held: list[bool], share: float, reserved: list[bool]) -> None:
    assert reserved_engines(held, share) == reserved


@pytest.mark.parametrize(
    ("slots", "running", "waiting", "kv", "expected"),
    [
        (None, 8, 2, None, 8),  # requests wait while it runs 8: its batch holds 8
        (12, 8, 2, None, 8),  # fewer than thought (KV pressure)
        (12, 8, 2, 0.95, 8),  # waiting with its KV full: it holds 8
        (None, 0, 3, None, 1),  # never below one
        # waiting with KV to spare: a prompt waits a step for the token budget, the batch is not full
        (None, 3, 1, 0.3, None),
        (12, 3, 1, 0.3, 12),
        (8, 8, 0, None, 9),  # it ran 8 with nobody waiting: it may hold more
        (8, 8, 0, 0.3, 9),
        (8, 5, 0, None, 8),
        (None, 5, 0, None, None),  # never seen full: unknown
        (8, None, None, None, 8),  # no scrape: as it was
    ],
)
def test_learn_slots(
    slots: float | None,
    running: float | None,
    waiting: float | None,
    kv: float | None,
    expected: float | None,
) -> None:
    assert learn_slots(slots, running, waiting, kv) == expected


@pytest.mark.parametrize(
    ("current", "tokens", "ttft", "expected"),
    [
        (RATE, 17_000, 0.25, 68_000),  # twice as fast as thought
        (RATE, 17_000, 0.01, 4 * RATE),  # a lucky one: clipped to four times the default
        (RATE, 17_000, 0.001, None),  # too short to say anything
        (RATE, 0, 0.5, None),  # nothing to prefill (a full hit)
        (RATE, 1_023, 2.0, None),  # a short uncached tail: its TTFT is the engine's step time
        # a cold turn on a shared-GPU engine (~5K tokens/s): 2,340 tokens in 0.47 s is a sample,
        # though it is only 0.07 s of work at the 34K default (the old rule took no such sample)
        (RATE, 2_340, 0.468, 5_000),
        (RATE, 2_340, 0.2, None),  # quick, and quick at the rate so far: the step time counts
        (8_000, 2_340, 0.2, 11_700),  # 0.29 s of work at the rate so far: a sample
        (RATE, 17_000, 1_000.0, 250),  # a stalled request: the floor is a safety bound only
    ],
)
def test_rate_sample(current: float, tokens: float, ttft: float, expected: float | None) -> None:
    got = rate_sample(current, RATE, tokens, ttft)
    assert got == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("current", "samples", "weight", "expected"),
    [
        (RATE, [], 0.1, RATE),
        (RATE, [68_000], 0.5, 0.5 * RATE + 0.5 * 68_000),  # an EWMA of its weight
        (RATE, [5_000], 0.1, 0.9 * RATE + 500),  # one slow sample moves it a tenth of the way
        (RATE, [250], 0.1, 0.9 * RATE + 25),  # one stalled request: no more
        (RATE, [RATE, 250, 250], 0.1, 0.9 * RATE + 25),  # two in a row: no more
        # three in a row, each more than twice off the same way: the rate is wrong, take their median
        (RATE, [5_200, 4_800, 5_000], 0.1, 5_000),
        (5_000.0, [20_000, 34_000, 30_000], 0.1, 30_000),
        (RATE, [5_000, 20_000, 5_000], 0.1, 0.9 * RATE + 500),  # not all far off: the EWMA
        (RATE, [9_000, 5_000, 5_000, 5_000], 0.1, 5_000),  # only the latest three count
        (300.0, [250, 250, 250], 0.5, 275),  # the floor holds whatever the samples
        (RATE, [5_200, 4_800, 5_000], 0.0, RATE),  # learning off
    ],
)
def test_learn_rate(current: float, samples: list[float], weight: float, expected: float) -> None:
    assert learn_rate(current, samples, weight) == pytest.approx(expected)


def test_the_rate_follows_a_slow_engine_down_and_one_stall_does_not_swing_it() -> None:
    rate, samples = RATE, deque[float](maxlen=3)

    def cold_turn(ttft: float) -> float:
        sample = rate_sample(rate, RATE, 2_340, ttft)
        assert sample is not None
        samples.append(sample)
        return learn_rate(rate, samples, 0.1)

    for _ in range(3):  # cold turns on an engine prefilling 5,000 tokens/s
        rate = cold_turn(2_340 / 5_000)
    assert rate == pytest.approx(5_000)
    rate = cold_turn(30.0)  # one request stuck behind a full batch
    assert rate >= 0.9 * 5_000
    for _ in range(40):
        rate = cold_turn(2_340 / 5_000)
    assert rate == pytest.approx(5_000, rel=0.01)


@pytest.mark.parametrize(
    ("in_flight", "slots", "waiting", "kv", "waits"),
    [
        (4, 4.0, 0, 0.5, False),  # it took the last slot
        (5, 4.0, 0, 0.5, True),  # one more than the batch holds
        (5, None, None, None, False),  # nothing learnt or scraped: a free slot assumed
        (2, 8.0, 3, 0.95, True),  # others wait there for KV: so does it
        (2, 8.0, 3, None, True),  # ... KV usage not scraped: as if full
        (2, 8.0, 3, 0.5, False),  # KV to spare: they wait a step for its token budget (prefill)
        (2, 8.0, 0, 0.99, False),  # KV full but nobody waits: it is running
    ],
)
def test_waits_for_slot(
    in_flight: int, slots: float | None, waiting: float | None, kv: float | None, waits: bool
) -> None:
    assert waits_for_slot(in_flight, slots, waiting, kv) is waits
