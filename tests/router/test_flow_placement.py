"""The hit engine or one with room (router/flow/placement.py), table by table."""

from __future__ import annotations

import pytest

from kvstack.router.flow.placement import Option, prefer_hit_engine

RATE = 1000.0
PROMPT = 3000.0


@pytest.mark.parametrize(
    ("hit", "free", "only_backlog", "prefer"),
    [
        # it holds 2,900 of 3,000 tokens behind 500 of backlog (0.6 s) against a cold 3.0 s elsewhere
        (Option(2900, 500, RATE), Option(0, 0, RATE), True, True),
        # behind 2,500 tokens of backlog (2.6 s): still sooner than 3.0 s cold
        (Option(2900, 2500, RATE), Option(0, 0, RATE), True, True),
        # behind 3,000 (3.1 s): the cold prefill elsewhere is sooner
        (Option(2900, 3000, RATE), Option(0, 0, RATE), True, False),
        # the engine with room holds most of it too: 0.1 s there beats 0.6 s
        (Option(2900, 500, RATE), Option(2900, 0, RATE), True, False),
        (Option(2900, 500, RATE), Option(2000, 0, RATE), True, True),  # 0.6 s against 1.0 s
        # saturated for another reason (its batch full, requests waiting in it): no wait to weigh
        (Option(2900, 500, RATE), Option(0, 0, RATE), False, False),
        # a faster engine with room prefills the cold prompt sooner (1.0 s against 1.1 s)
        (Option(2900, 1000, RATE), Option(0, 0, 3 * RATE), True, False),
        (Option(0, 0, RATE), Option(0, 0, RATE), True, False),  # nobody holds anything
    ],
)
def test_prefer_hit_engine(hit: Option, free: Option, only_backlog: bool, prefer: bool) -> None:
    assert prefer_hit_engine(PROMPT, hit, free, only_backlog) == prefer
