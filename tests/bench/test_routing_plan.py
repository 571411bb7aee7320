"""``bench routing``'s plan: the quick mode is the same comparison, much smaller; options win."""

from __future__ import annotations

import pytest

from kvstack.bench import routing, routing_plan, workloads


def _trace_seconds(plan: routing_plan.RoutingPlan) -> float:
    """Seconds of open-loop traffic the plan replays (each case replays its trace once)."""
    setup = routing.RoutingSetup(
        engines=plan.engines, num_gpu_blocks=plan.num_gpu_blocks, speed=plan.speed, scale=plan.scale
    )
    seconds = 0.0
    for name in plan.workloads:
        for regime in plan.regimes:
            w = workloads.build(
                name,
                setup.capacity_tokens,
                regime,
                scale=setup.scale,
                prefill_tokens_per_s=setup.prefill_tokens_per_s,
            )
            seconds += w.num_requests / w.notes["request_rate"]
    return seconds * len(plan.policies) * plan.repeat


def test_quick_is_the_same_comparison_at_a_fraction_of_the_size() -> None:
    full, quick = routing_plan.plan(False), routing_plan.plan(True)
    assert (full.quick, quick.quick) == (False, True)
    assert full.cases == 4 * 2 * 5 * 3
    assert quick.cases == 4 <= full.cases / 20
    # still a comparison: a baseline against cache-aware routing, on more than one workload
    assert {"round_robin", "cache_aware"} <= set(quick.policies) and len(quick.workloads) >= 2
    assert quick.engines < full.engines
    # the traffic it replays fits in well under two minutes, with time left for starting stacks
    assert _trace_seconds(quick) <= 45
    assert _trace_seconds(full) > 20 * _trace_seconds(quick)


def test_given_options_win_over_the_mode() -> None:
    plan = routing_plan.plan(True, policies=["prefix_trie", "cache_aware"], repeat=2, engines=3, workloads=[])
    assert plan.policies == ("prefix_trie", "cache_aware")
    assert (plan.repeat, plan.engines) == (2, 3)
    assert plan.workloads == routing_plan.QUICK["workloads"]  # an empty list is not given
    assert plan.speed == routing_plan.QUICK["speed"]


@pytest.mark.parametrize(
    ("given", "option"),
    [
        ({"workloads": ["chat"]}, "--workload"),
        ({"regimes": ["over"]}, "--regime"),
        ({"policies": ["fastest"]}, "--policy"),
        ({"repeat": 0}, "--repeat"),
    ],
)
def test_a_bad_option_is_named(given: dict[str, object], option: str) -> None:
    with pytest.raises(routing_plan.PlanError) as err:
        routing_plan.plan(False, **given)
    assert err.value.option == option
