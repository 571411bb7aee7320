"""The hit engine or one with room (router/flow/placement.py), table by table."""

from __future__ import annotations

import pytest

from kvstack.router.flow.placement import Option, prefer_hit_engine, slot_wait_s

RATE = 1000.0
PROMPT = 3000.0


@pytest.mark.parametrize(
    ("hit", "free", "waitable", "prefer"),
    [
        # other engines have room too: the first token decides
        # it holds 2,900 of 3,000 tokens behind 500 of backlog (0.6 s) against a cold 3.0 s elsewhere
        (Option(2900, 500, RATE), Option(0, 0, RATE), True, True),
        # behind 2,500 tokens of backlog (2.6 s): still sooner than 3.0 s cold
        (Option(2900, 2500, RATE), Option(0, 0, RATE), True, True),
        # behind 3,000 (3.1 s): the cold prefill elsewhere is sooner
        (Option(2900, 3000, RATE), Option(0, 0, RATE), True, False),
        # the engine with room holds most of it too: 0.1 s there beats 0.6 s
        (Option(2900, 500, RATE), Option(2900, 0, RATE), True, False),
        (Option(2900, 500, RATE), Option(2000, 0, RATE), True, True),  # 0.6 s against 1.0 s
        # saturated for a reason not waited out there (KV full, kept clear, no slot wait known yet)
        (Option(2900, 500, RATE), Option(0, 0, RATE), False, False),
        # its batch full: a slot in 0.5 s, then 0.6 s of prefill, against a cold 3.0 s elsewhere
        (Option(2900, 500, RATE, slot_wait_s=0.5), Option(0, 0, RATE), True, True),
        # a slot only in 2.5 s: 3.1 s there, the cold prefill elsewhere is sooner
        (Option(2900, 500, RATE, slot_wait_s=2.5), Option(0, 0, RATE), True, False),
        # a faster engine with room prefills the cold prompt sooner (1.0 s against 1.1 s)
        (Option(2900, 1000, RATE), Option(0, 0, 3 * RATE), True, False),
        (Option(0, 0, RATE), Option(0, 0, RATE), True, False),  # nobody holds anything
        # a session's second turn (H200, 2026-12-05): behind 3,500 tokens (3.6 s) its own engine
        # loses to a cold 3.0 s, but with a shared store the other engine loads the 2,900 tokens
        # from Redis instead (1.2 s beyond computing them): 4.2 s there, so it waits
        (Option(2900, 3500, RATE), Option(0, 0, RATE), True, False),
        (Option(2900, 3500, RATE), Option(0, 0, RATE, load_s=1.2), True, True),
        # ... and a load at its own engine counts too: 3.6 + 1.0 s against 3.0 s
        (Option(2900, 2500, RATE, load_s=1.0), Option(0, 0, RATE), True, False),
    ],
)
def test_prefer_hit_engine(hit: Option, free: Option, waitable: bool, prefer: bool) -> None:
    assert prefer_hit_engine(PROMPT, hit, free, waitable) == prefer


@pytest.mark.parametrize(
    ("hit", "free", "waitable", "prefer"),
    [
        # the engine with room is the last one: cost = first token + the delay its own prefill
        # adds there for the next request (uncached / rate)
        # behind 3,000 (3.1 + 0.1 s) against a cold 3.0 + 3.0 s: wait, where the first token alone
        # would have gone cold (the table above)
        (Option(2900, 3000, RATE), Option(0, 0, RATE), True, True),
        # behind 5,900 (6.0 + 0.1 s against 6.0 s): the cold engine
        (Option(2900, 5900, RATE), Option(0, 0, RATE), True, False),
        # a slot in 2.5 s (3.2 s) against 6.0 s: wait; a slot only in 5.5 s (6.2 s): cold
        (Option(2900, 500, RATE, slot_wait_s=2.5), Option(0, 0, RATE), True, True),
        (Option(2900, 500, RATE, slot_wait_s=5.5), Option(0, 0, RATE), True, False),
        # a faster engine with room, at 3x: 1.0 + 1.0 s against 2.0 + 0.1 s there (cold) or 1.9 s
        (Option(2900, 1900, RATE), Option(0, 0, 3 * RATE), True, False),
        (Option(2900, 1700, RATE), Option(0, 0, 3 * RATE), True, True),
        # the engine with room holds most of it too: 0.1 + 0.1 s against 0.6 + 0.1 s
        (Option(2900, 500, RATE), Option(2900, 0, RATE), True, False),
        (Option(2900, 500, RATE), Option(0, 0, RATE), False, False),  # not waited out there: never
    ],
)
def test_prefer_hit_engine_when_the_engine_with_room_is_the_last(
    hit: Option, free: Option, waitable: bool, prefer: bool
) -> None:
    assert prefer_hit_engine(PROMPT, hit, free, waitable, last_room=True) == prefer


@pytest.mark.parametrize(
    ("option", "ttft_s", "cost_s"),
    [
        (Option(2900, 500, RATE), 0.6, 0.7),  # 500 queued + 100 of its own; then its 100 delay the next
        (Option(0, 0, RATE), 3.0, 6.0),  # cold: its 3,000 tokens, and 3,000 ahead of the next
        (Option(3000, 200, RATE, slot_wait_s=0.5), 0.7, 0.7),  # a full hit adds nothing
        (Option(4000, 0, RATE), 0.0, 0.0),  # holds more than the prompt (a stale count): nothing left
    ],
)
def test_option_ttft_and_cost(option: Option, ttft_s: float, cost_s: float) -> None:
    assert option.ttft_s(PROMPT) == pytest.approx(ttft_s)
    assert option.cost_s(PROMPT) == pytest.approx(cost_s)


@pytest.mark.parametrize(
    ("service_s", "in_flight", "waiting", "wait_s"),
    [
        (2.0, 8, 0, 0.25),  # eight running, each 2 s: a slot frees every 0.25 s
        (2.0, 8, 3, 1.0),  # three wait there first: the fourth slot
        (2.0, 1, 0, 2.0),
        (2.0, 0, 0, 2.0),  # nothing of ours counted there: at least one request's time
        (2.0, 4, -1, 0.5),  # a stale negative queue counts as none
    ],
)
def test_slot_wait(service_s: float, in_flight: int, waiting: float, wait_s: float) -> None:
    assert slot_wait_s(service_s, in_flight, waiting) == pytest.approx(wait_s)
