"""Issue #23's goals per (engines, workload, load) (gpu_verdict), and the matrix plot's values."""

from __future__ import annotations

import math
from typing import Any

import pytest

from kvstack.bench.gpu_plot import matrix_bars
from kvstack.bench.gpu_verdict import table, verdicts


def row(
    policy: str, run: int, p50: float, p90: float, hits: float | None, errors: int = 0, **kw: Any
) -> dict[str, Any]:
    base = {"engines": 2, "workload": "multi_round_qa", "load": 0.5}
    return {
        **base,
        **kw,
        "policy": policy,
        "run": run,
        "ttft_p50": p50,
        "ttft_p90": p90,
        "prefix_hit_rate": hits,
        "errors": errors,
    }


K, S, RR = "cache_aware", "sglang_cache_aware", "round_robin"


@pytest.mark.parametrize(
    ("rows", "outcome", "unmet"),
    [
        ([row(K, 1, 0.1, 0.5, 0.85), row(S, 1, 0.2, 0.6, 0.85)], "met", set()),  # ties on hits meet
        ([row(K, 1, 0.1, 0.5, 0.85), row(S, 1, 0.1, 0.5, 0.85)], "met", set()),
        ([row(K, 1, 0.3, 0.5, 0.85), row(S, 1, 0.2, 0.6, 0.85)], "not_met", {"ttft_p50"}),
        ([row(K, 1, 0.1, 0.7, 0.85), row(S, 1, 0.2, 0.6, 0.85)], "not_met", {"ttft_p90"}),
        ([row(K, 1, 0.1, 0.5, 0.84), row(S, 1, 0.2, 0.6, 0.85)], "not_met", {"prefix_hit_rate"}),
        ([row(K, 1, 0.1, 0.5, None), row(S, 1, 0.2, 0.6, 0.85)], "not_met", {"prefix_hit_rate"}),
        ([row(K, 1, 0.1, 0.5, 0.9, errors=1), row(S, 1, 0.2, 0.6, 0.85)], "not_met", {"failed"}),
        # the baseline's failures are reported, not held against kvstack
        ([row(K, 1, 0.1, 0.5, 0.9), row(S, 1, 0.2, 0.6, 0.85, errors=3)], "met", set()),
        # every paired run must meet it: run 2 loses at p90
        (
            [
                row(K, 1, 0.1, 0.5, 0.9),
                row(S, 1, 0.2, 0.6, 0.85),
                row(K, 2, 0.1, 0.9, 0.9),
                row(S, 2, 0.2, 0.6, 0.85),
            ],
            "not_met",
            {"ttft_p90"},
        ),
        # a kvstack run without a baseline partner still counts for failures
        (
            [row(K, 1, 0.1, 0.5, 0.9), row(S, 1, 0.2, 0.6, 0.85), row(K, 2, 9, 9, 0.1, errors=2)],
            "not_met",
            {"failed"},
        ),
        ([row(K, 1, 0.1, 0.5, 0.9), row(RR, 1, 0.2, 0.6, 0.85)], "no_baseline", set()),
        ([row(K, 1, 0.1, 0.5, 0.9), row(S, 2, 0.2, 0.6, 0.85)], "no_baseline", set()),
        ([row(S, 1, 0.1, 0.5, 0.9), row(RR, 1, 0.2, 0.6, 0.85)], "no_kvstack", set()),
    ],
)
def test_verdict(rows: list[dict[str, Any]], outcome: str, unmet: set[str]) -> None:
    (v,) = verdicts(rows)
    assert v.outcome == outcome
    assert {g.name for g in v.goals if not g.met} == unmet


def test_one_verdict_per_engines_workload_load_in_order() -> None:
    rows = [
        row(K, 1, 0.1, 0.5, 0.9, engines=2, load=0.3),
        row(S, 1, 0.2, 0.6, 0.8, engines=2, load=0.3),
        row(K, 1, 0.3, 0.5, 0.9, engines=2, load=0.9),
        row(S, 1, 0.2, 0.6, 0.8, engines=2, load=0.9),
        row(K, 1, 0.1, 0.5, 0.9, engines=4, load=0.3),
    ]
    found = verdicts(rows)
    assert [(v.engines, v.load, v.outcome) for v in found] == [
        (2, 0.3, "met"),
        (2, 0.9, "not_met"),
        (4, 0.3, "no_baseline"),
    ]
    doc = found[1].as_json()
    assert doc["goals"]["ttft_p50"] == {"met": False, "kvstack": [0.3], "baseline": [0.2]}


def test_another_baseline() -> None:
    (v,) = verdicts([row(K, 1, 0.1, 0.5, 0.9), row(RR, 1, 0.2, 0.6, 0.85)], baseline=RR)
    assert v.outcome == "met"


def test_table_prints_each_goal_per_run_and_the_verdict() -> None:
    lines = table(verdicts([row(K, 1, 0.1, 0.7, 0.9), row(S, 1, 0.2, 0.6, 0.85)]))
    assert lines[0].startswith("goals: cache_aware vs sglang_cache_aware")
    assert lines[1].split()[:3] == ["engines", "workload", "load"]
    assert "GPU+LMCache hit %" in lines[1]
    cells = lines[2]
    assert "100/200 ok" in cells and "700/600 NO" in cells and "90.0/85.0 ok" in cells
    assert "-/- NO" in cells  # rows without the LMCache-inclusive rate
    assert cells.endswith("not met")


@pytest.mark.parametrize(
    ("ours", "theirs", "better"),
    [
        # section 19's pairs: the GPU rate under the peer's by one compulsory system-prompt miss,
        # the rate with LMCache's hits at or over it
        ((0.840, 0.8418), (0.842, 0.8418), True),
        ((0.840, 0.8410), (0.842, 0.8418), False),
        ((0.840, None), (0.842, 0.8418), False),
    ],
)
def test_the_lmcache_inclusive_rate_is_compared_but_not_a_goal(
    ours: tuple[float, float | None], theirs: tuple[float, float], better: bool
) -> None:
    (v,) = verdicts(
        [
            row(K, 1, 0.1, 0.5, ours[0], cached_rate=ours[1]),
            row(S, 1, 0.2, 0.6, theirs[0], cached_rate=theirs[1]),
        ]
    )
    assert v.outcome == "not_met"  # the GPU hit rate alone decides
    assert {g.name for g in v.goals if not g.met} == {"prefix_hit_rate"}
    (info,) = v.info
    assert (info.name, info.met) == ("cached_rate", better)
    assert v.as_json()["info"]["cached_rate"]["better"] is better
    mine = "-" if ours[1] is None else f"{ours[1] * 100:.1f}"
    assert f"{mine}/{theirs[1] * 100:.1f} {'ok' if better else 'NO'}" in table([v])[2]


def test_matrix_bars_group_runs_and_carry_the_verdict() -> None:
    rows = [
        row(K, 1, 0.1, 0.5, 0.9),
        row(S, 1, 0.2, 0.6, None),
        row(K, 2, 0.3, 0.5, 0.8),
        row(S, 2, 0.2, 0.6, 0.7),
    ]
    doc = {"cases": rows, "verdict": [v.as_json() for v in verdicts(rows)]}
    bars = matrix_bars(doc)
    assert bars["policies"] == [K, S]
    assert bars["names"] == ["2 engines\nmulti_round_qa\nload 0.5\nnot met"]
    group = (2, "multi_round_qa", 0.5)
    assert bars["values"]["ttft_p50"][(group, K)] == pytest.approx([100.0, 300.0])
    hits = bars["values"]["prefix_hit_rate"][(group, S)]
    assert math.isnan(hits[0]) and hits[1] == pytest.approx(70.0)
