"""The flow-control issue's GPU goals (item 4), from a ramp's rows: a table of runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvstack.bench import flow_plan
from kvstack.bench.flow_gpu_goals import goals
from kvstack.bench.flow_plan import Results

FLOW, PEER = flow_plan.FLOW.name, flow_plan.PEER.name

H200 = Path(__file__).parents[2] / "bench-results" / "flow" / "h200-s25"


def row(policy: str, load: float, **fields: Any) -> dict[str, Any]:
    base = {
        "policy": policy,
        "load": load,
        "goodput_rps": 4.0,
        "ttft_p50_s": 0.2,
        "ttft_p90_s": 0.6,
        "ttft_p99_s": 0.9,
        "errors": 0,
        "lost": 0,
        "shed": 0,
        "shed_with_retry_after": 0,
    }
    return {**base, **fields}


def verdicts(rows: list[dict[str, Any]]) -> dict[str, bool | None]:
    return {g.name: g.met for g in goals(Results(ramp=rows))}


MET = [
    row(FLOW, 0.5, goodput_rps=4.0, ttft_first_attempt_p90_s=0.5),
    row(PEER, 0.5, ttft_first_attempt_p90_s=0.6),
    row(FLOW, 2.0, goodput_rps=3.5, ttft_p99_s=1.4, shed=30, shed_with_retry_after=30),
    row(PEER, 2.0, ttft_p50_s=9.0, goodput_rps=0.5),
]


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        pytest.param(MET, [True, True, True, True, True], id="all-met"),
        pytest.param(
            [*MET[:3], row(PEER, 2.0, ttft_p50_s=3.0)], [False, True, True, True, True], id="not-overloaded"
        ),
        pytest.param(
            [*MET[:2], row(FLOW, 2.0, goodput_rps=3.0, ttft_p99_s=1.6), MET[3]],
            [True, False, False, True, True],
            id="goodput-0.75x-p99-late",
        ),
        pytest.param(
            [*MET[:2], row(FLOW, 2.0, shed=5, shed_with_retry_after=4), MET[3]],
            [True, True, True, False, True],
            id="a-refusal-without-retry-after",
        ),
        pytest.param(
            [MET[0], row(PEER, 0.5, ttft_first_attempt_p90_s=0.4), *MET[2:]],
            [True, True, True, True, False],
            id="behind-below-saturation",
        ),
        pytest.param(
            [row(FLOW, 2.0), row(PEER, 2.0, ttft_p50_s=9.0)], [True, None, True, True], id="no-load-below-1x"
        ),
    ],
)
def test_goals(rows: list[dict[str, Any]], expected: list[bool | None]) -> None:
    assert list(verdicts(rows).values()) == expected


def test_a_simulator_run_has_no_gpu_goals() -> None:
    assert goals(Results(ramp=[row(FLOW, 0.5), row(FLOW, 2.0)])) == []
    assert [g.met for g in goals(Results(ramp=[row(PEER, 2.0)]))] == [None]  # flow control not run


def test_the_h200_run_of_session_25() -> None:
    """The two routers' JSON files of that run, joined: overloaded (SGLang p50 18.9 s), goodput
    kept (0.93x), p99 17.7 s, nothing refused, below saturation 0.64 against 0.62 s."""
    ramp = [
        r
        for name in ("h4-flow-cache_aware.json", "h4-flow-sglang_cache_aware.json")
        for r in json.loads((H200 / name).read_text())["ramp"]
    ]
    assert list(verdicts(ramp).values()) == [True, True, False, True, False]


def test_the_goodput_detail_gives_the_admitted_attempt_beside_the_verdict() -> None:
    """Session 26's H100 ramp at 16/s: 2.70/s on time from the first attempt, 5.85/s from the
    admitted one; the verdict stays on the first (0.675x), the detail says both."""
    rows = [
        *MET[:2],
        row(FLOW, 2.0, goodput_rps=2.7, goodput_last_attempt_rps=5.85, shed=169, shed_with_retry_after=169),
        MET[3],
    ]
    goodput = goals(Results(ramp=rows))[1]
    assert goodput.met is False
    assert goodput.detail == "0.675x (2.7 against 4.0/s); from the admitted attempt 1.462x (5.85/s)"
    without = goals(Results(ramp=[*MET[:2], row(FLOW, 2.0, goodput_rps=2.7), MET[3]]))[1]
    assert without.detail == "0.675x (2.7 against 4.0/s)"
