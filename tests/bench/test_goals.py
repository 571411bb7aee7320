"""The routing benchmark's goal check (pure; table-driven)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from kvstack.bench.routing import goals, missed


def row(policy: str, regime: str, p90: float, hit: float = 0.95, cv: float = 0.05) -> dict[str, Any]:
    return {
        "workload": "w",
        "regime": regime,
        "policy": policy,
        "ttft_p90": p90,
        "hit_vs_oracle": hit,
        "load_cv": cv,
    }


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        pytest.param(
            [
                row("round_robin", "pressured", 1.0),
                row("prefix_trie", "pressured", 0.5),
                row("cache_aware", "pressured", 0.4),
            ],
            [],
            id="pressured-all-met",
        ),
        pytest.param(
            [
                row("round_robin", "pressured", 1.0),
                row("prefix_trie", "pressured", 0.5),
                row("cache_aware", "pressured", 0.45),
            ],
            ["ttft_p90_vs_prefix_trie"],
            id="pressured-close-to-the-trie",
        ),
        pytest.param(
            [row("round_robin", "pressured", 0.8), row("cache_aware", "pressured", 0.41, hit=0.8, cv=0.3)],
            ["ttft_p90_vs_round_robin", "hit_vs_oracle", "load_cv"],
            id="pressured-three-missed-trie-not-run",
        ),
        pytest.param(
            [
                row("least_loaded", "under", 0.2),
                row("round_robin", "under", 0.5),
                row("cache_aware", "under", 0.25),
            ],
            ["ttft_p90_vs_best_baseline"],
            id="under-worse-than-best",
        ),
        pytest.param(
            # under-filled: the 0.5x round-robin bound does not apply
            [row("round_robin", "under", 0.3), row("cache_aware", "under", 0.25)],
            [],
            id="under-only-best-baseline",
        ),
    ],
)
def test_goals(rows: list[dict[str, Any]], expected: list[str]) -> None:
    (entry,) = goals(rows)
    assert entry["missed"] == expected


def test_an_unmeasured_goal_is_missed() -> None:
    entry = {"regime": "pressured", "hit_vs_oracle": math.nan, "load_cv": 0.0}
    assert missed(entry) == ["hit_vs_oracle"]


def test_no_entry_without_our_policy() -> None:
    assert goals([row("round_robin", "under", 0.3)]) == []
