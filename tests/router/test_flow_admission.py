"""Flow control's admission, table by table: dispatch, queue or a 429, its predicted TTFT, its
Retry-After, and what the first tokens teach the prediction."""

from __future__ import annotations

import dataclasses

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

RATE = 34_000.0  # an H200 prefills ~34K tokens/s cold (the router's default)


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
OVERLOADED_BUSY = dataclasses.replace(ROOM_BUSY, overloaded=True, prefill_by_tenant={"t": 68_000})
NONE = Capacity(engines=0, room=False, prefill_tokens_per_s=0, prefill_in_flight=0)


def new(
    tenant: str = "t",
    priority: int = 0,
    cost: float = 3400,
    objective: float | None = None,
    prompt: float | None = None,
) -> Newcomer:
    return Newcomer(tenant, priority, cost, objective, prompt)


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
        # ... until the model is overloaded (a request of it queued or refused lately): then room lasts
        # until the next arrival, and a warm request (3,400 of 34,000 prompt tokens to prefill) on
        # time alone but late behind the prefill sent is refused as rule 2a refuses it from the queue
        # (0.01 + 1.0 + 0.1 s against 1.0 s)
        (new(objective=1.0, prompt=34_000), queue_state(), OVERLOADED_BUSY, "shed", "slo_room", (None, None)),
        (new(objective=1.0, prompt=6_800), queue_state(), OVERLOADED_BUSY, "shed", "slo_room", (None, None)),
        # ... not when its tenant holds less than its share of that prefill (the wait is others' work)
        (
            new("b", objective=1.0, prompt=34_000),
            queue_state(),
            OVERLOADED_BUSY,
            "dispatch",
            "room",
            (None, None),
        ),
        (
            new("b", objective=1.0, prompt=34_000),
            queue_state(),
            dataclasses.replace(OVERLOADED_BUSY, prefill_by_tenant={"t": 34_000, "b": 34_000}),
            "shed",
            "slo_room",
            (None, None),
        ),
        # ... not a cold one (more than half its prompt to prefill, or its prompt unknown): its
        # prediction adds its prefill to the work in flight, and the engine overlaps them
        (new(objective=1.0, prompt=6_000), queue_state(), OVERLOADED_BUSY, "dispatch", "room", (None, None)),
        (new(objective=1.0), queue_state(), OVERLOADED_BUSY, "dispatch", "room", (None, None)),
        # ... nor one that is late by its own prefill (refusing those was tried and reverted)
        (
            new(cost=68_000, objective=0.5, prompt=10**6),
            queue_state(),
            OVERLOADED_BUSY,
            "dispatch",
            "room",
            (None, None),
        ),
        # ... nor one whose class has no objective, nor one on time behind what is in flight
        (new(prompt=34_000), queue_state(), OVERLOADED_BUSY, "dispatch", "room", (None, None)),
        (new(objective=1.2, prompt=34_000), queue_state(), OVERLOADED_BUSY, "dispatch", "room", (None, None)),
        (
            new(objective=1.0, prompt=34_000),
            queue_state(),
            dataclasses.replace(ROOM, overloaded=True),
            "dispatch",
            "room",
            (None, None),
        ),
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
    # refused with room: told to come back when the prefill in flight is done (68K at 68K tokens/s)
    assert decide(new(objective=1.0, prompt=34_000), queue_state(), OVERLOADED_BUSY).retry_after_s == 1.0
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
