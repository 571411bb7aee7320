"""The KVStack conditions, decided from what an apply or an evaluation observed: table tests."""

from __future__ import annotations

from typing import Any

import pytest

from kvstack.operator.autoscale import Decision, Reason
from kvstack.operator.conditions import (
    Condition,
    Conditions,
    evaluated,
    lost,
    reconciled,
    render,
    set_condition,
)
from kvstack.operator.controller import Evaluation, ModelOutcome
from kvstack.operator.spec import KVStackSpec, parse_spec
from kvstack.operator.status import iso


def spec(models: int = 1, *, router: bool = True, autoscaling: bool = True) -> KVStackSpec:
    return parse_spec(
        {
            "models": [{"name": f"m{i}", "model": "x"} for i in range(models)],
            "router": {"enabled": router},
            "autoscaling": {"enabled": autoscaling},
        }
    )


def model(name: str, ready: int, desired: int, reason: Reason | None = None) -> ModelOutcome:
    entry = {"name": name, "currentReplicas": desired, "readyReplicas": ready, "desiredReplicas": desired}
    decision = None if reason is None else Decision(desired, "none", reason, f"{reason} said {name}", ())
    return ModelOutcome(entry, decision)


ROUTER_READY = {"replicas": 1, "readyReplicas": 1, "selector": "a=b"}
QUERIED: dict[str, Any] = {"prometheus_ok": True}
HELD = "holding replicas: Prometheus unreachable"


def seen(*models: ModelOutcome, router: dict[str, Any] | None = None, **kw: Any) -> Evaluation:
    return Evaluation(models=list(models), router=dict(ROUTER_READY if router is None else router), **kw)


@pytest.mark.parametrize(
    ("observed", "stack", "want"),
    [
        pytest.param(
            seen(model("m0", 1, 1, "steady"), **QUERIED),
            spec(),
            {
                "PrometheusReachable": Condition(True, "QuerySucceeded"),
                "ScalingActive": Condition(True, ("steady",), "m0: steady said m0"),
                "Ready": Condition(True, "AllReady", "1/1", 7),
            },
            id="all-ready-and-steady",
        ),
        pytest.param(
            seen(model("m0", 1, 2, "queue"), model("m1", 1, 1, "steady"), **QUERIED),
            spec(2),
            {
                "PrometheusReachable": Condition(True, "QuerySucceeded"),
                "ScalingActive": Condition(
                    True, ("queue", "steady"), "m0: queue said m0; m1: steady said m1"
                ),
                "Ready": Condition(False, "Progressing", "2/3", 7),
            },
            id="scaling-up-is-progressing-reasons-sorted",
        ),
        pytest.param(
            seen(
                model("m0", 1, 1, "metrics_unavailable"), model("m1", 1, 1, "metrics_unavailable"), **QUERIED
            ),
            spec(2),
            {
                "PrometheusReachable": Condition(True, "QuerySucceeded"),
                "ScalingActive": Condition(
                    False,
                    ("metrics_unavailable",),
                    "m0: metrics_unavailable said m0; m1: metrics_unavailable said m1",
                ),
                "Ready": Condition(True, "AllReady", "2/2", 7),
            },
            id="no-data-anywhere-is-inactive",
        ),
        pytest.param(
            seen(model("m0", 1, 1, "metrics_unavailable"), model("m1", 1, 1, "steady"), **QUERIED),
            spec(2),
            {
                "PrometheusReachable": Condition(True, "QuerySucceeded"),
                "ScalingActive": Condition(
                    True,
                    ("metrics_unavailable", "steady"),
                    "m0: metrics_unavailable said m0; m1: steady said m1",
                ),
                "Ready": Condition(True, "AllReady", "2/2", 7),
            },
            id="data-for-one-model-is-active",
        ),
        pytest.param(
            seen(model("m0", 1, 1, "metrics_unavailable"), prometheus_ok=False, prometheus_error="refused"),
            spec(),
            {
                "PrometheusReachable": Condition(False, "QueryFailed", "refused"),
                "ScalingActive": Condition(False, "MetricsUnavailable", HELD),
                "Ready": Condition(True, "AllReady", "1/1", 7),
            },
            id="prometheus-down-holds",
        ),
        pytest.param(
            seen(model("m0", 1, 1)),
            spec(autoscaling=False),
            {
                "ScalingActive": Condition(False, "Disabled", "spec.autoscaling.enabled is false"),
                "Ready": Condition(True, "AllReady", "1/1", 7),
            },
            id="autoscaling-off",
        ),
        pytest.param(
            seen(),
            spec(),
            {"Ready": Condition(False, "Progressing", "0/0", 7)},
            id="nothing-asked-yet-leaves-prometheus-conditions-alone",
        ),
        pytest.param(
            seen(model("m0", 1, 1, "steady"), **QUERIED),
            spec(2),
            {
                "PrometheusReachable": Condition(True, "QuerySucceeded"),
                "ScalingActive": Condition(True, ("steady",), "m0: steady said m0"),
                "Ready": Condition(False, "Progressing", "1/1", 7),
            },
            id="a-model-without-its-deployment-is-not-ready",
        ),
        pytest.param(
            seen(model("m0", 1, 1), **QUERIED),
            spec(),
            {
                "PrometheusReachable": Condition(True, "QuerySucceeded"),
                "ScalingActive": Condition(True, "NoModels", ""),
                "Ready": Condition(True, "AllReady", "1/1", 7),
            },
            id="answered-without-a-decision-never-writes-an-empty-reason",
        ),
        pytest.param(
            seen(model("m0", 0, 0), router={}),
            spec(autoscaling=False),
            {
                "ScalingActive": Condition(False, "Disabled", "spec.autoscaling.enabled is false"),
                "Ready": Condition(False, "Progressing", "0/0", 7),
            },
            id="router-deployment-missing",
        ),
        pytest.param(
            seen(model("m0", 0, 0), router={"replicas": 2, "readyReplicas": 1}),
            spec(autoscaling=False),
            {
                "ScalingActive": Condition(False, "Disabled", "spec.autoscaling.enabled is false"),
                "Ready": Condition(False, "Progressing", "0/0", 7),
            },
            id="router-half-ready",
        ),
        pytest.param(
            seen(model("m0", 0, 0), router={}),
            spec(router=False, autoscaling=False),
            {
                "ScalingActive": Condition(False, "Disabled", "spec.autoscaling.enabled is false"),
                "Ready": Condition(True, "AllReady", "0/0", 7),
            },
            id="scaled-to-zero-without-router-is-ready",
        ),
    ],
)
def test_an_evaluation_decides_the_conditions(
    observed: Evaluation, stack: KVStackSpec, want: Conditions
) -> None:
    assert evaluated(observed, stack, 7) == want


def test_the_scaling_message_is_bounded() -> None:
    models = [model(f"m{i}", 1, 1, "steady") for i in range(30)]
    long = [ModelOutcome(m.entry, Decision(1, "none", "steady", "x" * 500, ())) for m in models]
    got = evaluated(seen(*long, **QUERIED), spec(30), 1)["ScalingActive"]
    assert len(got.message) == 2000 and got.reason_text == "steady"


@pytest.mark.parametrize(
    ("result", "want"),
    [
        ("applied", {"Reconciled": Condition(True, "Applied", "detail", 3)}),
        ("failed", {"Reconciled": Condition(False, "ApplyFailed", "detail", 3)}),
        (
            "invalid",
            {
                "Reconciled": Condition(False, "InvalidSpec", "detail", 3),
                "Ready": Condition(False, "InvalidSpec", "detail", 3),
            },
        ),
    ],
)
def test_an_apply_decides_reconciled(result: Any, want: Conditions) -> None:
    assert reconciled(result, "detail", 3) == want


def test_condition_transition_time_moves_only_with_its_status() -> None:
    first = set_condition([], "Ready", Condition(False, "Progressing", "0/1", 1), now=100.0)
    same = set_condition(first, "Ready", Condition(False, "Progressing", "0/2", 2), now=200.0)
    moved = set_condition(same, "Ready", Condition(True, "AllReady", "2/2"), now=300.0)
    assert first[0]["lastTransitionTime"] == same[0]["lastTransitionTime"] == iso(100.0)
    assert same[0]["message"] == "0/2" and same[0]["observedGeneration"] == 2
    assert moved[0]["lastTransitionTime"] == iso(300.0) and moved[0]["status"] == "True"
    assert "observedGeneration" not in moved[0]
    other = set_condition(moved, "PrometheusReachable", Condition(True, "QuerySucceeded"), now=400.0)
    assert [c["type"] for c in other] == ["Ready", "PrometheusReachable"]


def test_render_writes_every_condition_this_process_set_over_another_writers_list() -> None:
    mine: Conditions = {
        "Reconciled": Condition(True, "Applied", "1 models applied", 2),
        "ScalingActive": Condition(True, ("queue", "steady"), "m: ..."),
    }
    # Another writer's older list: Reconciled from before, a condition not ours kept as it is.
    theirs = [
        {"type": "Reconciled", "status": "True", "reason": "Applied", "lastTransitionTime": iso(10.0)},
        {"type": "Other", "status": "True", "reason": "X", "lastTransitionTime": iso(10.0)},
    ]
    assert lost(theirs, mine)
    out = render(theirs, mine, now=50.0)
    assert [(c["type"], c["reason"]) for c in out] == [
        ("Reconciled", "Applied"),
        ("Other", "X"),
        ("ScalingActive", "queue,steady"),
    ]
    assert out[0]["lastTransitionTime"] == iso(10.0) and out[0]["observedGeneration"] == 2
    assert out[2]["lastTransitionTime"] == iso(50.0)
    assert not lost(out, mine)


@pytest.mark.parametrize(
    ("existing", "is_lost"),
    [
        ([], True),
        ([{"type": "Ready", "status": "True", "reason": "AllReady"}], False),
        ([{"type": "Ready", "status": "False", "reason": "AllReady"}], True),
        ([{"type": "Ready", "status": "True", "reason": "Progressing"}], True),
        ([{"type": "Ready", "status": "True", "reason": "AllReady", "message": "old"}], False),
    ],
)
def test_a_condition_is_lost_when_status_lacks_or_contradicts_it(
    existing: list[dict[str, Any]], is_lost: bool
) -> None:
    assert lost(existing, {"Ready": Condition(True, "AllReady", "1/1")}) is is_lost
    assert not lost(existing, {})
