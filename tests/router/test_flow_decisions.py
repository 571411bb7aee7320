"""The pure decisions of flow control, table by table: saturation, ordering, fair shares, admission."""

from __future__ import annotations

import dataclasses
import math
from collections import deque

import pytest

from kvstack.router.flow.admission import (
    Capacity,
    Decision,
    Newcomer,
    QueueState,
    decide,
    expiry,
    learn_correction,
    predict_alone,
    predict_ttft,
    retry_after,
)
from kvstack.router.flow.fairness import FairShare, fair_work_ahead, over_share
from kvstack.router.flow.ordering import Waiting, next_waiting, order_key
from kvstack.router.flow.saturation import (
    EngineLoad,
    Limits,
    class_share,
    learn_rate,
    learn_slots,
    rate_sample,
    reserved_engines,
    saturation,
)

RATE = 34_000.0
LIMITS = Limits(prefill_target_s=0.25, max_kv_usage=0.95, max_waiting=0, max_in_flight=None)

# ---------------------------------------------------------------- saturation


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


@pytest.mark.parametrize(
    ("tenant", "cost", "queued", "weights", "ahead"),
    [
        ("a", 100, {}, {}, 0),  # nobody waits
        ("a", 100, {"a": 500}, {}, 500),  # its own queue is all ahead
        ("b", 100, {"a": 5000}, {}, 100),  # A is served as much as B's newcomer: 100 of A's 5,000
        ("a", 100, {"a": 5000, "b": 300}, {}, 5300),  # A's newcomer is behind all of it
        ("b", 100, {"a": 5000, "b": 300}, {}, 300 + 400),
        ("b", 100, {"a": 5000}, {"a": 3.0}, 300),  # A's weight 3: thrice B's work goes first
        ("b", 100, {"a": 5000}, {"b": 2.0}, 50),
        ("b", 100, {"a": 50}, {}, 50),  # A holds less than B's turn: all of it
    ],
)
def test_fair_work_ahead(
    tenant: str, cost: float, queued: dict[str, float], weights: dict[str, float], ahead: float
) -> None:
    assert fair_work_ahead(tenant, cost, queued, weights, 0.0) == pytest.approx(ahead)


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


# ---------------------------------------------------------------- ordering


def w(
    seq: int,
    arrival: float,
    *,
    priority: int = 0,
    tenant: str = "t",
    cost: float = 100,
    deadline: float = math.inf,
) -> Waiting:
    return Waiting(seq, arrival, priority, tenant, cost, deadline)


def first_tenant(tenants: set[str]) -> str:
    return min(tenants)


@pytest.mark.parametrize(
    ("ordering", "items", "expected"),
    [
        ("fcfs", [w(2, 2.0), w(1, 1.0), w(3, 3.0)], 1),
        ("fcfs", [w(1, 1.0), w(2, 2.0, priority=5)], 2),  # the class before anything else
        ("edf", [w(1, 1.0, deadline=9.0), w(2, 2.0, deadline=3.0)], 2),
        ("edf", [w(1, 1.0), w(2, 2.0, deadline=50.0)], 2),  # no objective: after every deadline
        ("edf", [w(1, 1.0), w(2, 2.0)], 1),  # no deadlines: arrival order
        ("cheapest", [w(1, 1.0, cost=5000), w(2, 1.05, cost=100)], 2),
        # aging: waited 1 s, worth RATE tokens, so the long prompt goes before a newer short one
        ("cheapest", [w(1, 0.0, cost=20_000), w(2, 1.0, cost=100)], 1),
        ("cheapest", [w(1, 0.0, cost=100), w(2, 0.0, cost=100)], 1),  # a tie: the lower sequence
        ("cheapest", [w(1, 0.0, cost=9e9), w(2, 1.0, cost=1, priority=1)], 2),
    ],
)
def test_next_waiting(ordering: str, items: list[Waiting], expected: int) -> None:
    chosen = next_waiting(items, ordering, RATE, first_tenant)  # type: ignore[arg-type]
    assert chosen is not None and chosen.seq == expected


def test_nobody_waiting_and_tenants_picked_only_among_the_top_class() -> None:
    assert next_waiting([], "fcfs", RATE, first_tenant) is None
    asked: list[set[str]] = []

    def pick(tenants: set[str]) -> str:
        asked.append(tenants)
        return "b"

    items = [w(1, 1.0, tenant="a"), w(2, 2.0, tenant="b"), w(3, 0.5, tenant="c", priority=-1)]
    chosen = next_waiting(items, "fcfs", RATE, pick)
    assert chosen is not None and chosen.seq == 2
    assert asked == [{"a", "b"}]


def test_cheapest_keys_never_change_while_waiting() -> None:
    a, b = w(1, 0.0, cost=20_000), w(2, 0.4, cost=100)
    assert order_key(b, "cheapest", RATE) < order_key(a, "cheapest", RATE)  # b jumps a: it is cheap
    c = w(3, 0.6, cost=100)  # 0.6 s later a has aged past c's cost
    assert order_key(a, "cheapest", RATE) < order_key(c, "cheapest", RATE)


# ---------------------------------------------------------------- fair shares


def serve(fair: FairShare, backlog: dict[str, int], cost: float, rounds: int) -> dict[str, int]:
    """Serve ``rounds`` requests of ``cost`` tokens from tenants always waiting; counts per tenant."""
    for tenant in backlog:
        fair.waiting(tenant)
    served = dict.fromkeys(backlog, 0)
    for _ in range(rounds):
        tenant = fair.pick(set(backlog))
        fair.charge(tenant, cost)
        served[tenant] += 1
    return served


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({}, {"a": 50, "b": 50}),
        ({"a": 3.0}, {"a": 75, "b": 25}),
        ({"a": 1.0, "b": 4.0}, {"a": 20, "b": 80}),
    ],
)
def test_weighted_shares_of_backlogged_tenants(weights: dict[str, float], expected: dict[str, int]) -> None:
    assert serve(FairShare(weights), {"a": 1, "b": 1}, 1000, 100) == expected


def test_cost_counts_tokens_as_well_as_requests() -> None:
    fair = FairShare({}, request_tokens=0)
    for tenant in ("big", "small"):
        fair.waiting(tenant)
    served = {"big": 0, "small": 0}
    for _ in range(110):
        tenant = fair.pick({"big", "small"})
        fair.charge(tenant, 10_000 if tenant == "big" else 1_000)
        served[tenant] += 1
    assert served == {"big": 10, "small": 100}  # equal tokens, not equal requests


def test_an_idle_tenant_banks_no_credit_and_its_state_is_forgotten() -> None:
    fair = FairShare({})
    serve(fair, {"a": 1}, 1000, 50)  # a alone takes everything: work conserving
    fair.waiting("b")  # b arrives late: it starts level with a, not 50 requests ahead
    assert serve(fair, {"a": 1, "b": 1}, 1000, 10) == {"a": 5, "b": 5}
    fair.idle("a")
    fair.idle("b")
    assert fair.vtime == {}


@pytest.mark.parametrize(
    ("tenant", "queued", "weights", "over"),
    [
        ("a", {}, {}, False),  # alone: the whole queue is its share
        ("a", {"a": 1000}, {}, False),
        ("a", {"a": 1000, "b": 2000}, {}, False),
        ("a", {"a": 3000, "b": 1000}, {}, True),
        ("a", {"a": 2000, "b": 1000}, {"a": 3.0}, False),
        ("b", {"a": 3000, "b": 900}, {"a": 3.0}, False),  # exactly its quarter with the newcomer
        ("b", {"a": 3000, "b": 1500}, {"a": 3.0}, True),
    ],
)
def test_over_share(tenant: str, queued: dict[str, float], weights: dict[str, float], over: bool) -> None:
    assert over_share(tenant, 100, queued, weights, 0) is over


# ---------------------------------------------------------------- admission


def queue_state(
    count: int = 0,
    *,
    tokens: float = 0,
    max_count: int = 10,
    max_tokens: int = 100_000,
    ahead: float | None = None,
    waiting_ahead: int | None = None,
    lowest: int | None = None,
    work: dict[str, float] | None = None,
) -> QueueState:
    return QueueState(
        count=count,
        tokens=tokens,
        max_count=max_count,
        max_tokens=max_tokens,
        tokens_ahead=tokens if ahead is None else ahead,
        waiting_ahead=count if waiting_ahead is None else waiting_ahead,
        lowest_priority=lowest if lowest is not None or not count else 0,
        work=work or ({"t": tokens} if count else {}),
        weights={},
        request_tokens=0,
    )


def bounded(max_wait_s: float, count: int = 0, tokens: float = 0.0) -> QueueState:
    """A queue whose requests may wait at most ``max_wait_s`` (the router's ``queue_timeout_s``)."""
    return dataclasses.replace(queue_state(count, tokens=tokens, max_count=100), max_wait_s=max_wait_s)


def held_state(count: int = 0, tokens: float = 0.0, max_count: int = 10, max_held: int = 4) -> QueueState:
    return dataclasses.replace(queue_state(count, tokens=tokens, max_count=max_count), max_held=max_held)


ROOM = Capacity(engines=2, room=True, prefill_tokens_per_s=2 * RATE, prefill_in_flight=0, base_ttft_s=0.01)
FULL = Capacity(
    engines=2, room=False, prefill_tokens_per_s=2 * RATE, prefill_in_flight=68_000, base_ttft_s=0.01
)
ROOM_BUSY = dataclasses.replace(ROOM, prefill_in_flight=68_000)
NONE = Capacity(engines=0, room=False, prefill_tokens_per_s=0, prefill_in_flight=0)


def new(tenant: str = "t", priority: int = 0, cost: float = 3400, objective: float | None = None) -> Newcomer:
    return Newcomer(tenant, priority, cost, objective)


@pytest.mark.parametrize(
    ("newcomer", "queue", "cap", "outcome", "reason", "victim"),
    [
        (new(), queue_state(), ROOM, "dispatch", "room", (None, None)),
        # room, but someone of its class waits already: no overtaking
        (new(), queue_state(1, tokens=100), ROOM, "queue", "queued", (None, None)),
        # room and only lower classes wait: it goes first
        (
            new(priority=1),
            queue_state(1, tokens=100, ahead=0, waiting_ahead=0),
            ROOM,
            "dispatch",
            "room",
            (None, None),
        ),
        (new(), queue_state(), FULL, "queue", "queued", (None, None)),
        # predicted: 0.01 + 68,000/68,000 + 3,400/34,000 = 1.11 s
        (new(objective=1.0), queue_state(), FULL, "shed", "slo", (None, None)),
        (new(objective=1.2), queue_state(), FULL, "queue", "queued", (None, None)),
        # the batch backlog behind it does not count against an interactive request
        (
            new(priority=1, objective=1.2),
            queue_state(5, tokens=90_000, ahead=0, waiting_ahead=0),
            FULL,
            "queue",
            "queued",
            (None, None),
        ),
        # no ready engine (scale from zero): held in the queue, whatever its objective (no prediction),
        # bounded by the hold's bound, not the queue's
        (new(objective=0.001), held_state(), NONE, "queue", "held", (None, None)),
        (new(), held_state(3, tokens=300, max_count=0), NONE, "queue", "held", (None, None)),
        (new(priority=5), held_state(4, tokens=400), NONE, "shed", "hold_full", (None, None)),
        (new(), queue_state(), NONE, "shed", "hold_full", (None, None)),  # the hold's bound is 0
        (new(), queue_state(10, tokens=1000), FULL, "shed", "queue_full", (None, None)),
        (new(), queue_state(1, tokens=99_000), FULL, "shed", "queue_full", (None, None)),  # by tokens
        (
            new(cost=200_000),
            queue_state(),
            FULL,
            "queue",
            "queued",
            (None, None),
        ),  # alone: a long prompt fits
        (new(), queue_state(0, max_count=0), FULL, "shed", "queue_full", (None, None)),  # no queue at all
        (new(priority=1), queue_state(10, tokens=1000, lowest=0), FULL, "queue", "displace_lower", (0, None)),
        (
            new("a", cost=100),
            queue_state(10, tokens=1000, work={"a": 800, "b": 200}),
            FULL,
            "shed",
            "over_share",
            (None, None),
        ),
        (
            new("b", cost=100),
            queue_state(10, tokens=1000, work={"a": 800, "b": 200}),
            FULL,
            "queue",
            "displace_over_share",
            (0, "a"),
        ),
        (
            new("c", cost=100),
            queue_state(10, tokens=1000, work={"a": 500, "b": 500}),
            FULL,
            "queue",
            "displace_over_share",
            (0, "a"),
        ),
        # a predicted miss is the tenant's over its share: A's 68,000 queued tokens are all ahead of
        # A's newcomer (0.01 + 1.0 + 0.1 s), only 3,400 of them ahead of B's (0.01 + 0.05 + 0.1 s)
        (
            new("A", objective=1.0),
            queue_state(10, tokens=68_000, max_count=100, work={"A": 68_000}),
            dataclasses.replace(FULL, prefill_in_flight=0),
            "shed",
            "slo",
            (None, None),
        ),
        (
            new("B", objective=1.0),
            queue_state(10, tokens=68_000, max_count=100, work={"A": 68_000}),
            dataclasses.replace(FULL, prefill_in_flight=0),
            "queue",
            "queued",
            (None, None),
        ),
        # no objective, but the queue's own bound on a wait (queue_timeout_s): refused at once when the
        # prediction is past it (FULL: 0.01 + 1.0 + 0.1 = 1.11 s), instead of a 429 once it ran out
        (new(), bounded(1.0), FULL, "shed", "wait_bound", (None, None)),
        (new(), bounded(1.2), FULL, "queue", "queued", (None, None)),
        # ... only what the queue's turn rate says: 30 ahead at 1 turn/s is 31 s of turns
        (
            new(),
            bounded(30.0, 30, tokens=3_000),
            dataclasses.replace(FULL, prefill_in_flight=0, turns_per_s=1.0),
            "shed",
            "wait_bound",
            (None, None),
        ),
        (
            new(),
            bounded(30.0, 30, tokens=3_000),
            dataclasses.replace(FULL, prefill_in_flight=0, turns_per_s=2.0),
            "queue",
            "queued",
            (None, None),
        ),
        # an objective tighter than the bound is the reason given
        (new(objective=1.0), bounded(1.0), FULL, "shed", "slo", (None, None)),
        # room, or no engine yet (a hold: no prediction): the bound refuses nothing
        (new(), bounded(0.001), ROOM, "dispatch", "room", (None, None)),
        (
            new(),
            dataclasses.replace(held_state(), max_wait_s=0.001),
            NONE,
            "queue",
            "held",
            (None, None),
        ),
        # its own prefill alone misses the objective (68,000 tokens at one engine's 34K tokens/s: 0.01 +
        # 2.0 s on an idle engine) and nobody waits: refusing it helps no one below saturation, so it is
        # queued and served late; FULL's 68,000 tokens in flight are a 1 s wait, but a request with
        # nothing to prefill would still be on time against a 1.5 s objective
        (
            new(cost=68_000, objective=1.5),
            queue_state(),
            FULL,
            "queue",
            "queued_prefill",
            (None, None),
        ),
        # ... the same request while others wait for the capacity it would take: refused
        (
            new(cost=68_000, objective=1.5),
            queue_state(1, tokens=100),
            FULL,
            "shed",
            "slo_prefill",
            (None, None),
        ),
        # ... also when only a lower class waits: it would take the next engine before them
        (
            new(priority=1, cost=68_000, objective=1.5),
            queue_state(1, tokens=100, ahead=0, waiting_ahead=0),
            FULL,
            "shed",
            "slo_prefill",
            (None, None),
        ),
        # ... and while the wait alone misses the objective (the model is saturated: 1 s objective,
        # FULL's 1 s of prefill in flight)
        (new(cost=68_000, objective=1.0), queue_state(), FULL, "shed", "slo_prefill", (None, None)),
        # a request that would be on time on an idle engine and misses by the wait keeps the 429 'slo'
        # (FULL: 0.01 + 1.0 + 0.1 s against 1.0 s), whether anyone waits or not
        (new(objective=1.0), queue_state(1, tokens=100), FULL, "shed", "slo", (None, None)),
        # with room and nobody waiting it is dispatched whatever its own prefill (rule 1) ...
        (new(cost=68_000, objective=0.5), queue_state(), ROOM, "dispatch", "room", (None, None)),
        # ... and whatever the prefill in flight on the model's engines (ROOM_BUSY: 1 s of it): that
        # is spread over engines, and the one with room may have none. Holding such requests to the
        # pooled prediction refused 40 % of the flow ramp at 0.5x capacity (bench-results/flow, flow15)
        (new(objective=1.0), queue_state(), ROOM_BUSY, "dispatch", "room", (None, None)),
        # admitted late, it still meets the queue's bound on a wait (rule 3) ...
        (
            new(cost=68_000, objective=1.5),
            dataclasses.replace(queue_state(), max_wait_s=1.2),
            FULL,
            "shed",
            "wait_bound",
            (None, None),
        ),
        # ... and the queue's size (rule 4: no queue at all here)
        (
            new(cost=68_000, objective=1.5),
            queue_state(0, max_count=0),
            FULL,
            "shed",
            "queue_full",
            (None, None),
        ),
        # a lower class never makes a higher one make way
        (
            new("c", priority=-1, cost=100),
            queue_state(10, tokens=1000, lowest=0, work={"a": 900, "b": 100}),
            FULL,
            "shed",
            "queue_full",
            (None, None),
        ),
    ],
)
def test_admission(
    newcomer: Newcomer,
    queue: QueueState,
    cap: Capacity,
    outcome: str,
    reason: str,
    victim: tuple[int | None, str | None],
) -> None:
    decision = decide(newcomer, queue, cap)
    assert (decision.outcome, decision.reason) == (outcome, reason)
    assert (decision.victim_priority, decision.victim_tenant) == victim


@pytest.mark.parametrize(
    ("held", "engines", "reason"),
    [
        (True, 0, "hold_timeout"),  # no engine came up: 503, come back in a while
        (True, 2, "queue_timeout"),  # engines came, but stayed saturated: 429
        (False, 2, "queue_timeout"),
        (False, 0, "queue_timeout"),  # its engines went away while it waited: not a hold
    ],
)
def test_expiry(held: bool, engines: int, reason: str) -> None:
    assert expiry(held, engines) == reason


def test_predictions_and_retry_after() -> None:
    assert predict_ttft(3400, 0, NONE) is None
    assert predict_ttft(3400, 34_000, FULL) == pytest.approx(0.01 + 1.5 + 0.1)
    # engines full of long decodes: 30 requests ahead (and its own turn) at 10 turns/s outweigh
    # their 1.5 s of prefill
    slow = dataclasses.replace(FULL, turns_per_s=10.0)
    assert predict_ttft(3400, 34_000, slow, waiting_ahead=30) == pytest.approx(0.01 + 3.1 + 0.1)
    assert predict_ttft(3400, 34_000, slow, waiting_ahead=5) == pytest.approx(0.01 + 1.5 + 0.1)
    assert predict_ttft(3400, 0, dataclasses.replace(slow, prefill_in_flight=0), 0) == pytest.approx(0.21)
    assert decide(new(objective=2.0), queue_state(30, tokens=34_000, max_count=100), slow).reason == "slo"
    assert decide(new(objective=2.0), queue_state(30, tokens=34_000, max_count=100), FULL).reason == "queued"
    shed: Decision = decide(new(), queue_state(10, tokens=136_000, max_tokens=10**6), FULL)
    assert shed.reason == "queue_full" and shed.retry_after_s == 3.0  # (68K + 136K) / 68K tokens/s
    huge = decide(new(), queue_state(10, tokens=10**8, max_tokens=10**9), FULL)
    assert huge.retry_after_s == 60.0  # capped
    idle = Capacity(engines=2, room=False, prefill_tokens_per_s=2 * RATE, prefill_in_flight=0)
    quick = decide(new(), queue_state(10, tokens=10), idle)
    assert quick.retry_after_s == 0.25  # the floor: a refused client does not come back at once


@pytest.mark.parametrize(
    ("queue", "retry_after"),
    [
        # everything queued is of its class or above: (68K in flight + 136K) / 68K tokens/s
        (queue_state(10, tokens=136_000, max_tokens=10**6), 3.0),
        # a batch flood queued below it: only the 34K of its class or above is ahead (exact, not
        # rounded up to whole seconds: the answer carries it as retry-after-ms)
        (queue_state(10, tokens=136_000, max_tokens=10**6, ahead=34_000, lowest=0), 1.5),
        # nothing of its class or above waits: the work in flight alone
        (queue_state(10, tokens=1_000_000, max_tokens=10**7, ahead=0, waiting_ahead=0, lowest=0), 1.0),
    ],
)
def test_retry_after_counts_the_work_ahead_of_the_refused_request(
    queue: QueueState, retry_after: float
) -> None:
    decision = decide(new(priority=10, objective=0.5), queue, FULL)
    assert decision.outcome == "shed" and decision.retry_after_s == retry_after


@pytest.mark.parametrize(
    ("cap", "waiting_ahead", "expected"),
    [
        (FULL, 0, 1.0),  # 68K in flight at 68K tokens/s
        (dataclasses.replace(FULL, correction=2.0), 0, 2.0),  # waits run twice the model: so does this
        (dataclasses.replace(FULL, correction=0.1), 0, 0.25),  # never under the floor
        # engines full of long decodes: 29 ahead and its own turn at 10 turns/s outlast the prefill
        (dataclasses.replace(FULL, turns_per_s=10.0), 29, 3.0),
        (dataclasses.replace(FULL, turns_per_s=10.0, room=True), 29, 1.0),  # a slot is free: prefill only
        (dataclasses.replace(FULL, prefill_in_flight=10**9), 0, 60.0),  # capped
        (dataclasses.replace(FULL, prefill_tokens_per_s=0.0), 0, 1.0),  # no rate measured
    ],
)
def test_retry_after_is_the_predicted_wait(cap: Capacity, waiting_ahead: int, expected: float) -> None:
    """A refused request is told to come back when the wait it was refused for has passed, as
    predict_ttft models that wait; told less, its retry meets the same wait and is refused again."""
    assert retry_after(0.0, cap, waiting_ahead) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("current", "actual", "predicted", "weight", "expected"),
    [
        (1.0, 2.01, 1.01, 0.5, 1.5),  # twice as late as predicted (above the base): halfway to 2
        (1.0, 0.51, 1.01, 1.0, 0.5),  # twice as early, full weight
        (1.0, 100.0, 1.01, 1.0, 4.0),  # one stalled request: clipped
        (1.0, 0.01, 1.01, 1.0, 0.25),  # one lucky one: clipped
        (2.0, 5.0, 0.01, 0.5, 2.0),  # predicted nothing but the base: nothing to learn
        (2.0, 5.0, 1.01, 0.0, 2.0),  # learning off
    ],
)
def test_learn_correction(
    current: float, actual: float, predicted: float, weight: float, expected: float
) -> None:
    assert learn_correction(current, actual, predicted, 0.01, weight) == pytest.approx(expected)


def test_the_floor_a_prompt_sets_alone() -> None:
    # an idle engine: nothing in flight, no turn to wait for, the learnt correction on its prefill
    slow = dataclasses.replace(FULL, turns_per_s=0.1, correction=2.0)
    assert predict_alone(3400, slow) == pytest.approx(0.01 + 2.0 * 0.1)
    assert predict_alone(3400, NONE) is None
    # the correction decides which side of the objective the floor is: learnt 2x late, a prompt of
    # 0.6 s alone misses a 1 s objective and is refused while the wait alone is past it
    late = dataclasses.replace(FULL, correction=2.0)
    assert decide(new(cost=20_400, objective=1.0), queue_state(), late).reason == "slo_prefill"
    assert decide(new(cost=20_400, objective=1.0), queue_state(), FULL).reason == "slo"


def test_the_correction_scales_the_wait_and_the_prefill_not_the_base() -> None:
    cap = dataclasses.replace(FULL, correction=0.5)
    # 0.01 + 0.5 x (68,000/68,000 + 3,400/34,000)
    assert predict_ttft(3400, 0, cap) == pytest.approx(0.01 + 0.5 * 1.1)
    # the request FULL sheds for a 1 s objective is queued once predictions are learnt 2x early
    assert decide(new(objective=1.0), queue_state(), cap).outcome == "queue"
