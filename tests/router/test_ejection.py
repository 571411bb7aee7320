"""Outlier detection (router/ejection.py): every outcome of ``judge_outcome`` from a table of
outcome sequences. Rules here: 3 in a row, or half of at least 4 in a 10 s window; 10 s base, 40 s
cap; half the engines at most."""

from __future__ import annotations

import pytest

from kvstack.router.ejection import OutlierRules, OutlierTrack, judge_outcome

RULES = OutlierRules(
    consecutive_failures=3,
    failure_rate=0.5,
    min_requests=4,
    interval_s=10.0,
    base_ejection_s=10.0,
    max_ejection_s=40.0,
    max_ejected_percent=50.0,
)

# each step: (time, "x" failure | "o" success, engines ejected elsewhere), then the expected reasons
# and the ejection time of each ejection, in order
Step = tuple[float, str, int]


@pytest.mark.parametrize(
    ("steps", "reasons", "ejected_for"),
    [
        pytest.param([(1, "o", 0)], ["success"], [], id="a-success"),
        pytest.param(
            [(1, "x", 0), (1, "x", 0), (1, "x", 0)],
            ["failure", "failure", "consecutive"],
            [10.0],
            id="three-in-a-row",
        ),
        pytest.param(
            [(1, "x", 0), (1, "o", 0), (1, "o", 0), (1, "x", 0)],
            ["failure", "success", "success", "failure_rate"],
            [10.0],
            id="half-of-four-or-more-failed",
        ),
        pytest.param(
            [(1, "x", 0), (1, "o", 0), (12, "x", 0), (12, "o", 0), (12, "x", 0)],
            ["failure", "success", "failure", "success", "failure"],
            [],
            id="the-rate-counts-one-window-only",
        ),
        pytest.param(
            [(1, "x", 0), (1, "x", 0), (1, "x", 1)],
            ["failure", "failure", "over_cap"],
            [],
            id="the-cap-keeps-half-the-engines-in",
        ),
        pytest.param(
            [(1, "x", 0), (1, "x", 0), (1, "x", 0), (5, "x", 0), (5, "o", 0)],
            ["failure", "failure", "consecutive", "while_ejected", "while_ejected"],
            [10.0],
            id="late-outcomes-of-an-ejected-engine-change-nothing",
        ),
        pytest.param(
            [(1, "x", 0), (1, "x", 0), (1, "x", 0), (11, "x", 0), (31, "x", 0), (61, "x", 0), (101, "x", 0)],
            ["failure", "failure"] + ["consecutive"] * 5,
            [10.0, 20.0, 30.0, 40.0, 40.0],
            id="back-from-ejection-one-failure-ejects-again-for-longer-up-to-the-cap",
        ),
        pytest.param(
            [(1, "x", 0), (1, "x", 0), (1, "x", 0), (11, "o", 0), (11, "x", 0)],
            ["failure", "failure", "consecutive", "success", "failure"],
            [10.0],
            id="a-success-after-return-clears-the-streak",
        ),
        pytest.param(
            [
                (1, "x", 0),
                (1, "x", 0),
                (1, "x", 0),
                (11, "o", 0),
                (22, "o", 0),
                (22, "x", 0),
                (22, "x", 0),
                (22, "x", 0),
            ],
            ["failure", "failure", "consecutive", "success", "success", "failure", "failure", "consecutive"],
            [10.0, 10.0],
            id="a-clean-window-brings-the-ejection-time-back-down",
        ),
    ],
)
def test_outcomes(steps: list[Step], reasons: list[str], ejected_for: list[float]) -> None:
    track = OutlierTrack()
    got, times = [], []
    for now, outcome, others in steps:
        verdict = judge_outcome(
            track, failed=outcome == "x", now=float(now), ejected_others=others, engines=2, rules=RULES
        )
        track = verdict.track
        got.append(verdict.reason)
        if verdict.ejected:
            times.append(verdict.ejected_for)
            assert track.ejected_until == now + verdict.ejected_for
    assert got == reasons
    assert times == ejected_for


@pytest.mark.parametrize(
    ("engines", "percent", "allowed"), [(1, 10, 1), (2, 50, 1), (4, 50, 2), (10, 10, 1), (10, 0, 1)]
)
def test_at_least_one_engine_may_be_ejected(engines: int, percent: float, allowed: int) -> None:
    assert OutlierRules(max_ejected_percent=percent).allowed_ejected(engines) == allowed
