"""Status helpers: per-model entries, the printer summary, each model's policy."""

from __future__ import annotations

import pytest

from kvstack.operator.autoscale import Decision
from kvstack.operator.spec import parse_spec
from kvstack.operator.status import all_ready, engines_summary, iso, model_entry, policy_for


def test_model_entry_keeps_the_last_scale_until_the_next() -> None:
    up = Decision(3, "up", "queue", "waiting 9", ())
    held = Decision(3, "none", "steady", "within tolerance", ())
    first = model_entry("m", "s-m", 1, 1, 3, up, None, now=10.0)
    second = model_entry("m", "s-m", 3, 1, 3, held, first, now=20.0)
    assert second["lastDecision"]["reason"] == "steady"
    assert second["lastScale"] == first["lastDecision"]
    assert second["lastScaleTime"] == iso(10.0)
    unobserved = model_entry("m", "s-m", 3, 3, 3, None, second, now=30.0)
    assert unobserved["lastDecision"] == second["lastDecision"]


@pytest.mark.parametrize(
    ("entries", "summary", "ready"),
    [
        ([], "0/0", True),
        (
            [{"readyReplicas": 2, "desiredReplicas": 2}, {"readyReplicas": 0, "desiredReplicas": 0}],
            "2/2",
            True,
        ),
        ([{"readyReplicas": 1, "desiredReplicas": 2}], "1/2", False),
        ([{"desiredReplicas": 1}], "0/1", False),
    ],
)
def test_summary_and_readiness(entries: list[dict[str, int]], summary: str, ready: bool) -> None:
    assert engines_summary(entries) == summary
    assert all_ready(entries) is ready


def test_policy_from_the_spec() -> None:
    spec = parse_spec(
        {
            "models": [{"name": "a", "model": "x", "minReplicas": 0, "maxReplicas": 7}],
            "autoscaling": {"metric": "kvCacheUsage", "scaleToZero": {"enabled": True}},
        }
    )
    policy = policy_for(spec.autoscaling, spec.models[0])
    assert (policy.signal, policy.target, policy.max_replicas) == ("kv_usage", 0.8, 7)
    assert policy.scale_to_zero and policy.down_window_s == 300 and policy.up_max_pods == 4
