"""The flow benchmark's pure parts: traces sized by rate and duration, the summary, the goals."""

from __future__ import annotations

import json

import pytest

from kvstack.bench import flow_plan
from kvstack.bench.flow_plan import Outcome, Results, Shape, Stream, build_trace, goals, summarize


def test_trace_rate_duration_and_streams() -> None:
    shape = Shape(rounds=4)
    trace = build_trace([Stream("A", 10.0, 8.0), Stream("B", 1.0, 8.0, "batch")], shape, seed=3)
    a = [s for stream, s in trace if stream.tenant == "A"]
    b = [s for stream, s in trace if stream.tenant == "B"]
    assert (len(a), len(b)) == (20, 2)  # rate x duration / rounds users each
    assert len({s.session_id for _, s in trace}) == len(trace)
    assert all(len(s.turns) == 4 and s.think_time == shape.think_s for _, s in trace)
    # one shared system prompt, then a private context per user
    system = a[0].system[: len(a[1].system) // 3]
    assert all(s.system.startswith(system) for _, s in trace)
    assert build_trace([Stream("A", 10.0, 8.0)], shape, seed=3)[0][1].system == a[0].system


def o(status: int, ttft: float | None = None, ok: bool | None = None, **kw: object) -> Outcome:
    return Outcome(
        tenant=str(kw.get("tenant", "A")),
        klass=str(kw.get("klass", "default")),
        sent_s=float(kw.get("sent", 0.0)),  # type: ignore[arg-type]
        status=status,
        ok=status == 200 if ok is None else ok,
        ttft_s=ttft,
        retry_after_s=kw.get("retry_after"),  # type: ignore[arg-type]
        attempts=int(kw.get("attempts", 1)),  # type: ignore[call-overload]
        refusals=int(kw.get("refusals", 0)),  # type: ignore[call-overload]
        user_ttft_s=kw.get("user_ttft"),  # type: ignore[arg-type]
        first_sent_s=kw.get("first_sent"),  # type: ignore[arg-type]
        cold=bool(kw.get("cold", False)),
        user=kw.get("user"),  # type: ignore[arg-type]
        admission=kw.get("admission"),  # type: ignore[arg-type]
        predicted_ttft_s=kw.get("predicted"),  # type: ignore[arg-type]
    )


SUMMARY_CASES = [
    # id, outcomes, duration, expected subset
    ("empty", [], 10.0, {"requests": 0, "goodput_rps": 0.0, "ttft_p99_s": None}),
    (
        "goodput counts only in-objective completions",
        [o(200, 0.5), o(200, 1.0), o(200, 1.5), o(429, retry_after=2.0)],
        2.0,
        {"completed": 3, "goodput_rps": 1.0, "shed": 1, "shed_rate": 0.25, "shed_with_retry_after": 1},
    ),
    (
        "errors and lost are neither done nor shed",
        [o(200, 0.2), o(0), o(503), o(200, 0.3, ok=False)],
        1.0,
        {"errors": 3, "lost": 1, "completed": 1, "good_share": 0.25},
    ),
    (
        "ttft of admitted only",
        [o(200, 0.1), o(200, 0.3), o(429)],
        1.0,
        {"ttft_p50_s": 0.2, "ttft_p99_s": 0.298},
    ),
    (
        "one attempt each: first-attempt TTFT is the only TTFT",
        [o(200, 0.5), o(200, 1.5)],
        1.0,
        {"attempts_per_request": 1.0, "refusals": 0, "ttft_first_attempt_p50_s": 1.0, "ttft_p50_s": 1.0},
    ),
    (
        "goodput by the first attempt's TTFT; shed only what the retries did not get served",
        [
            # refused once, served 0.6 s after its first send with a 0.3 s TTFT of its own: good
            o(200, 0.3, attempts=2, refusals=1, user_ttft=0.9, first_sent=1.0, sent=1.6),
            # admitted quickly on its third attempt, but its user waited 1.6 s: not good
            o(200, 0.2, attempts=3, refusals=2, user_ttft=1.6, first_sent=1.0, sent=2.4),
            # refused three times: a final refusal, and a cold one (its user had nothing served)
            o(429, attempts=3, refusals=3, cold=True, retry_after=1.0, first_sent=0.0, sent=1.0),
            o(200, 0.4),
        ],
        2.0,
        {
            "goodput_rps": 1.0,  # 0.9 and 0.4 of 0.9, 1.6, 0.4
            "goodput_last_attempt_rps": 1.5,  # 0.3, 0.2 and 0.4: had the retry waits cost nothing
            "cold_refusals": 3,
            "retry_wait_p50_s": 1.0,  # of 0.6, 1.4 and 1.0
            "retry_wait_max_s": 1.4,
            "shed": 1,
            "shed_rate": 0.25,
            "cold_shed": 1,
            "attempts": 9,
            "attempts_per_request": 2.25,
            "refusals": 6,
            "served_after_retry": 2,
            "ttft_p50_s": 0.3,  # of 0.3, 0.2, 0.4: last attempts
            "ttft_first_attempt_p50_s": 0.9,  # of 0.9, 1.6, 0.4
        },
    ),
    (
        "late admitted requests by how flow control let them in",
        [
            o(200, 1.4, admission="room", predicted=1.2, cold=True),
            o(200, 1.2, admission="queued", predicted=0.8),
            o(200, 1.6, admission="queued", predicted=0.9),
            o(200, 0.9, admission="queued", predicted=0.9),  # on time: not counted
            o(200, 2.0),  # no flow control
            o(429, admission=None),
        ],
        1.0,
        {
            "late_admitted": {
                "-": {"count": 1, "predicted_p50_s": None, "ttft_p50_s": 2.0, "cold": 0},
                "queued": {"count": 2, "predicted_p50_s": 0.85, "ttft_p50_s": 1.4, "cold": 0},
                "room": {"count": 1, "predicted_p50_s": 1.2, "ttft_p50_s": 1.4, "cold": 1},
            }
        },
    ),
    (
        "users never served",
        [o(429, user="u1"), o(429, user="u1"), o(200, 0.1, user="u2"), o(429, user="u2"), o(429)],
        1.0,
        {"users": 2, "users_never_served": 1},
    ),
]


@pytest.mark.parametrize(
    ("outcomes", "duration", "expected"), [pytest.param(*c[1:], id=c[0]) for c in SUMMARY_CASES]
)
def test_summary(outcomes: list[Outcome], duration: float, expected: dict[str, object]) -> None:
    row = summarize(outcomes, duration)
    assert {k: row[k] for k in expected} == expected


def test_by_group_splits_tenants() -> None:
    groups = flow_plan.by_group([o(200, 0.1, tenant="A"), o(429, tenant="B")], "tenant", 1.0)
    assert (groups["A"]["completed"], groups["B"]["shed"]) == (1, 1)


def _ramp(policy: str, load: float, goodput: float, p90: float, p99: float) -> dict[str, object]:
    return {"policy": policy, "load": load, "goodput_rps": goodput, "ttft_p90_s": p90, "ttft_p99_s": p99}


def test_goals_met_and_not_met() -> None:
    r = Results(
        ramp=[
            _ramp("cache_aware+flow", 0.5, 8.0, 0.30, 0.5),
            _ramp("cache_aware+flow", 1.0, 15.0, 0.40, 0.8),
            _ramp("cache_aware+flow", 2.0, 14.0, 0.50, 0.9),
            _ramp("cache_aware", 0.5, 8.0, 0.29, 0.5),
            _ramp("cache_aware", 1.0, 14.0, 0.50, 2.0),
            _ramp("cache_aware", 2.0, 1.0, 9.0, 12.0),
        ],
        fairness=[
            # another policy's rows never count
            {"policy": "cache_aware", "case": "B alone", "tenants": {"B": {"ttft_p90_s": 9.0}}},
            {"policy": "cache_aware+flow", "case": "B alone", "tenants": {"B": {"ttft_p90_s": 0.4}}},
            {
                "policy": "cache_aware+flow",
                "case": "A 10x + B",
                "tenants": {
                    "A": {"ttft_p90_s": 0.9, "shed_rate": 0.5},
                    "B": {"ttft_p90_s": 0.6, "shed_rate": 0.1},
                },
            },
        ],
        priority=[
            {
                "policy": "cache_aware+flow",
                "case": "interactive + batch flood",
                "classes": {"interactive": {"ttft_p99_s": 0.7, "shed_rate": 0.5}, "batch": {"completed": 0}},
            }
        ],
    )
    found = goals(r)
    met = {g.name: g.met for g in found}
    details = {g.name: g.detail for g in found}
    # rows without first-attempt TTFTs (before client retries): their one attempt is both
    assert (
        details["ramp: below capacity TTFT p90 within 5% of cache_aware"]
        == "1.034x (1.034x last attempt), 429 0%"
    )
    assert met == {
        "ramp: goodput at 2x >= 0.9x goodput at 1x (flow control)": True,  # 14 / 15
        "ramp: admitted TTFT p99 <= 1 s at 2x (flow control)": True,
        "ramp: without flow control goodput falls at 2x (the problem shown)": True,
        "ramp: below capacity TTFT p90 within 5% of cache_aware": True,  # 0.30 / 0.29 = 1.034
        "ramp: at capacity (1x) TTFT p90 within 5% of cache_aware": True,  # 0.40 / 0.50
        "fairness: B's TTFT p90 within 1.25x of B alone": False,  # 1.5x
        "fairness: B refused no more than A": True,
        "priority: interactive TTFT p99 <= 1 s under a batch flood": True,
        "priority: interactive served (>= 90% admitted) under the flood": False,
        "priority: the batch class still progresses": False,
    }


def test_the_p90_goals_compare_what_users_saw_from_their_first_attempt() -> None:
    """Flow control's admitted (last-attempt) p90 is lower, but its users waited out refusals."""
    first = "ttft_first_attempt_p90_s"
    r = Results(
        ramp=[
            {**_ramp("cache_aware+flow", 0.5, 5.0, 0.9, 1.1), first: 1.2},
            {**_ramp("cache_aware", 0.5, 5.0, 1.0, 1.2), first: 1.0},
        ]
    )
    (goal,) = (g for g in goals(r) if g.name == "ramp: below capacity TTFT p90 within 5% of cache_aware")
    assert (goal.met, goal.detail) == (False, "1.2x (0.9x last attempt), 429 0%")


def test_goals_not_run() -> None:
    assert {g.met for g in goals(Results())} == {None}


def test_the_fairness_window_gives_b_several_users_at_the_same_ratio() -> None:
    shape = Shape()
    b_rate = 1.5 * 12 / 11  # the scenario's B at capacity 12 req/s
    window = flow_plan.fairness_window_s(b_rate, 8.0, shape)
    b, a = Stream("B", b_rate, window), Stream("A", 10 * b_rate, window)
    sessions = build_trace([a, b], shape, seed=1)
    b_users = sum(1 for stream, _ in sessions if stream.tenant == "B")
    a_users = sum(1 for stream, _ in sessions if stream.tenant == "A")
    assert b_users == flow_plan.FAIRNESS_B_USERS
    assert a_users == pytest.approx(10 * b_users, abs=1)
    assert flow_plan.fairness_window_s(100.0, 8.0, shape) == 8.0  # a fast B needs no longer window


def decision(engines: int) -> str:
    return json.dumps(
        {"logger": flow_plan.DECISION_LOGGER, "engines": [{"engine": f"e{i}"} for i in range(engines)]}
    )


def narrowed(**saturated: str) -> str:
    return json.dumps({"logger": "kvstack.router.flow.room", "msg": "flow narrowed", "saturated": saturated})


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([], (0, 0, {})),
        ([decision(4), decision(4)], (2, 0, {})),
        (
            [
                narrowed(e1="overdue"),
                decision(3),
                decision(4),
                narrowed(e0="overdue", e2="full"),
                decision(2),
            ],
            (3, 2, {"overdue": 2, "full": 1}),
        ),
        # other lines, a torn line and plain text count for nothing
        (
            [
                json.dumps(
                    {"logger": "kvstack.router.flow.room", "msg": "flow placement: kvstack.router.decision"}
                ),
                '{"logger": "kvstack.router.decision", "eng',
                "INFO started",
                decision(2),
            ],
            (1, 1, {}),
        ),
    ],
)
def test_narrowed_decisions(lines: list[str], expected: tuple[int, int, dict[str, int]]) -> None:
    got = flow_plan.narrowed_decisions(lines, 4)
    assert (got["decisions"], got["narrowed"], got["saturated_by_reason"]) == expected


def test_first_touches_are_each_engine_s_earliest_request_and_the_p99_is_taken_without_them() -> None:
    def served(sent: float, engine: str | None, ttft: float) -> Outcome:
        return Outcome("A", "default", sent, 200, True, ttft, engine=engine)

    rows = [served(0.0, "e0", 1.17), served(0.1, "e1", 1.18), served(0.2, "e0", 0.1), served(0.3, "e1", 0.9)]
    rows += [Outcome("A", "default", 0.05, 429, False), served(0.4, "e0", 0.2)]
    row = summarize(rows, 1.0)
    assert row["first_touch_ttft_s"] == [1.17, 1.18]
    assert row["ttft_p99_s"] > 1.1 and row["ttft_p99_after_first_touch_s"] < 0.9
    assert "first_touch_ttft_s" not in summarize([served(0.0, None, 1.0)], 1.0)  # engines unknown
