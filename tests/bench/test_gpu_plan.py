"""The plan of ``kvstack bench gpu`` (gpu_plan): cases, order, traces, names and the estimate."""

from __future__ import annotations

from typing import Any

import pytest

from kvstack.bench.gpu_plan import (
    CASE_OVERHEAD_S,
    SAME_TRACE,
    SESSION_TAIL_S,
    PlanError,
    PlanSpec,
    case_seed,
    estimate_case_s,
    estimate_s,
    plan,
    rotated,
    salted,
    sized_workload,
    text_salt,
)

POLICIES = ("cache_aware", "sglang_cache_aware", "sglang_round_robin")


def spec(**values: Any) -> PlanSpec:
    base: dict[str, Any] = {
        "engines_available": 4,
        "workloads": ("multi_round_qa",),
        "loads": (0.5,),
        "policies": ("cache_aware", "round_robin"),
    }
    return PlanSpec(**{**base, **values})


def test_single_case_keeps_todays_tags_seeds_and_own_traces() -> None:
    cases = plan(spec(workloads=("multi_round_qa", "shared_prefix"), trace="r10"))
    assert [c.tag for c in cases] == [
        "multi_round_qa-cache_aware",
        "multi_round_qa-round_robin",
        "shared_prefix-cache_aware",
        "shared_prefix-round_robin",
    ]
    # the seeds the command drew before the matrix existed: case_seed(workload, policy, trace)
    assert [c.seed for c in cases] == [case_seed(c.workload, c.policy, "r10") for c in cases]
    assert {c.engines for c in cases} == {4} and {c.run for c in cases} == {1}


def test_trace_as_still_gives_every_policy_that_policys_trace() -> None:
    cases = plan(spec(trace="r10", trace_as="cache_aware"))
    assert {c.seed for c in cases} == {case_seed("multi_round_qa", "cache_aware", "r10")}


def test_the_issues_matrix() -> None:
    cases = plan(
        spec(
            workloads=("multi_round_qa", "shared_prefix"),
            loads=(0.3, 0.9, 1.3),
            policies=POLICIES,
            runs=2,
            engine_counts=(2, 4),
        )
    )
    assert len(cases) == 2 * 2 * 3 * 2 * 3
    assert len({c.tag for c in cases}) == len(cases)  # every case its own files
    assert cases[0].tag == "e2-multi_round_qa-l0.3-cache_aware-r1"
    # engine count is the outermost loop: one start of four engines serves 2 first, then 4
    assert [c.engines for c in cases[:36]] == [2] * 36 and cases[36].engines == 4


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        (1, ["cache_aware", "sglang_cache_aware", "sglang_round_robin"]),
        (2, ["sglang_cache_aware", "sglang_round_robin", "cache_aware"]),
        (3, ["sglang_round_robin", "cache_aware", "sglang_cache_aware"]),
        (4, ["cache_aware", "sglang_cache_aware", "sglang_round_robin"]),
    ],
)
def test_policies_rotate_per_run(run: int, expected: list[str]) -> None:
    assert rotated(POLICIES, run) == expected


def test_in_a_matrix_every_router_goes_first_once_per_as_many_runs() -> None:
    cases = plan(spec(policies=POLICIES, runs=3))
    firsts = [c.policy for c in cases if c is next(d for d in cases if d.run == c.run)]
    assert sorted(firsts) == sorted(POLICIES)


def test_a_matrix_shares_one_trace_per_engines_workload_load_run() -> None:
    cases = plan(spec(loads=(0.3, 0.9), policies=POLICIES, runs=2, engine_counts=(2, 4)))
    by_group: dict[tuple[int, float, int], set[int]] = {}
    for c in cases:
        assert c.trace_policy == SAME_TRACE
        by_group.setdefault((c.engines, c.load, c.run), set()).add(c.seed)
    assert all(len(seeds) == 1 for seeds in by_group.values())  # the routers see one trace
    # ...and no two (engines, load, run) share one: LMCache's CPU tier survives the reset
    assert len({next(iter(s)) for s in by_group.values()}) == len(by_group)


@pytest.mark.parametrize(
    ("values", "salts"),
    [
        ({}, {""}),
        ({"trace": "x"}, {"x"}),
        ({"runs": 2}, {"run1", "run2"}),
        ({"loads": (0.3, 0.9), "trace": "x"}, {"x/load0.3", "x/load0.9"}),
        ({"engine_counts": (2,)}, {"e2"}),
        ({"engine_counts": (2, 4), "runs": 2}, {"e2/run1", "e2/run2", "e4/run1", "e4/run2"}),
    ],
)
def test_salt_names_each_varied_dimension(values: dict[str, Any], salts: set[str]) -> None:
    assert {c.salt for c in plan(spec(**values))} == salts


@pytest.mark.parametrize(
    ("values", "same"),
    [
        ({}, False),  # a single case: each policy its own trace, as before
        ({"same_trace": True}, True),
        ({"runs": 2}, True),  # a matrix: one trace per run
        ({"runs": 2, "same_trace": False}, False),
        ({"engine_counts": (2,)}, True),
    ],
)
def test_same_trace_is_the_matrix_default(values: dict[str, Any], same: bool) -> None:
    cases = plan(spec(**values))
    shared = len({(c.run, c.seed) for c in cases}) == len({c.run for c in cases})
    assert shared is same


@pytest.mark.parametrize(
    ("values", "option"),
    [
        ({"workloads": ()}, "--workload"),
        ({"workloads": ("long_doc_qa",)}, "--workload"),
        ({"policies": ()}, "--policy"),
        ({"policies": ("cache_aware", "cache_aware")}, "--policy"),
        ({"loads": ()}, "--load"),
        ({"loads": (0.0,)}, "--load"),
        ({"loads": (float("nan"),)}, "--load"),
        ({"loads": (0.5, 0.5)}, "--load"),
        ({"runs": 0}, "--runs"),
        ({"engine_counts": (5,)}, "--engines-subset"),
        ({"engine_counts": (0,)}, "--engines-subset"),
        ({"engine_counts": (2, 2)}, "--engines-subset"),
    ],
)
def test_bad_plans_name_the_option(values: dict[str, Any], option: str) -> None:
    with pytest.raises(PlanError, match=option):
        plan(spec(**values))


@pytest.mark.parametrize(
    ("workload", "load", "duration", "expected"),
    [
        ("multi_round_qa", 0.5, 20.0, CASE_OVERHEAD_S + 20.0 + SESSION_TAIL_S["multi_round_qa"]),
        ("shared_prefix", 0.5, 20.0, CASE_OVERHEAD_S + 20.0 + SESSION_TAIL_S["shared_prefix"]),
        ("multi_round_qa", 1.0, 10.0, CASE_OVERHEAD_S + 10.0 + SESSION_TAIL_S["multi_round_qa"]),
        # past saturation the arrivals drain at capacity: the span stretches by the load
        ("multi_round_qa", 1.5, 10.0, CASE_OVERHEAD_S + 15.0 + SESSION_TAIL_S["multi_round_qa"]),
    ],
)
def test_case_estimate(workload: str, load: float, duration: float, expected: float) -> None:
    assert estimate_case_s(workload, load, duration) == pytest.approx(expected)


def test_plan_estimate_sums_its_cases() -> None:
    cases = plan(spec(loads=(0.5, 1.5), runs=2))
    per_run = estimate_case_s("multi_round_qa", 0.5, 8) + estimate_case_s("multi_round_qa", 1.5, 8)
    assert estimate_s(cases, 8.0) == pytest.approx(2 * 2 * per_run)  # 2 runs x 2 policies


def _bench_gpu(*args: str) -> Any:
    from typer.testing import CliRunner

    from kvstack.cli import app

    return CliRunner().invoke(app, ["bench", "gpu", "--sims", "2", *args])


def test_dry_run_prints_the_plan_and_its_estimate() -> None:
    args = ["--workload", "shared_prefix", "--load", "0.3", "--load", "1.5", "--runs", "2"]
    policies = ["--policy", "cache_aware", "--policy", "round_robin"]
    result = _bench_gpu("--dry-run", *args, *policies, "--duration-s", "8")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    per_run = estimate_case_s("shared_prefix", 0.3, 8) + estimate_case_s("shared_prefix", 1.5, 8)
    assert lines[0] == f"plan: 8 cases, estimated {4 * per_run / 60:.1f} min ({4 * per_run:.0f} s)"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "shared_prefix-l0.3-cache_aware-r1",
        "shared_prefix-l0.3-round_robin-r1",
        "shared_prefix-l0.3-round_robin-r2",  # run 2 starts with the other router
        "shared_prefix-l0.3-cache_aware-r2",
        "shared_prefix-l1.5-cache_aware-r1",
        "shared_prefix-l1.5-round_robin-r1",
        "shared_prefix-l1.5-round_robin-r2",
        "shared_prefix-l1.5-cache_aware-r2",
    ]


def test_a_plan_over_its_budget_is_refused_before_anything_starts() -> None:
    result = _bench_gpu("--load", "0.5", "--load", "0.9", "--runs", "2", "--budget-s", "60")
    assert result.exit_code == 2
    assert "over --budget-s 60" in result.output


def test_a_bad_option_is_named() -> None:
    result = _bench_gpu("--dry-run", "--engines-subset", "3")
    assert result.exit_code == 2
    assert "--engines-subset: 3 is not between 1 and the 2 engines available" in result.output


def test_on_a_shared_trace_each_router_has_its_own_prompt_prefix() -> None:
    cases = plan(spec(policies=POLICIES, runs=2))
    for run in (1, 2):
        salts = {c.policy: c.text_salt for c in cases if c.run == run}
        assert len(set(salts.values())) == len(POLICIES)  # LMCache's leftovers of one never hit another
        assert salts == {p: text_salt(p) for p in POLICIES}
    # own traces (a single case, --trace-as) keep today's prompts
    assert {c.text_salt for c in plan(spec())} == {""}
    assert {c.text_salt for c in plan(spec(runs=2, trace_as="cache_aware"))} == {""}


def test_salted_keeps_the_trace_and_changes_only_the_first_words() -> None:
    wl = sized_workload("multi_round_qa", 10, 0.5, 34_000, seed=3)
    a, b = salted(wl, text_salt("cache_aware")), salted(wl, text_salt("sglang_cache_aware"))
    assert salted(wl, "") is wl
    for x, y, orig in zip(a.sessions, b.sessions, wl.sessions, strict=True):
        assert (
            (x.start, x.turns, x.think_time)
            == (y.start, y.turns, y.think_time)
            == (orig.start, orig.turns, orig.think_time)
        )
        assert x.system != y.system and x.system.endswith(orig.system) and y.system.endswith(orig.system)
        assert len(x.system) == len(y.system)  # eight hex digits each
    assert (
        wl.sessions[0].system == sized_workload("multi_round_qa", 10, 0.5, 34_000, seed=3).sessions[0].system
    )
