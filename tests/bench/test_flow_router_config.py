"""The flow benchmark's router configs are accepted by the real router settings, in wall time."""

from __future__ import annotations

import pytest

from kvstack.bench.flow import FlowSetup, router_config
from kvstack.bench.flow_plan import POLICIES
from kvstack.router.config import RouterSettings


@pytest.mark.parametrize("policy", POLICIES, ids=[p.name for p in POLICIES])
def test_every_policy_config_loads(policy: object) -> None:
    setup = FlowSetup(speed=0.5, sim_config=None)
    settings = RouterSettings(**router_config(setup, policy))  # type: ignore[arg-type]
    fc = settings.flow_control
    assert fc.enabled == policy.flow  # type: ignore[attr-defined]
    if fc.enabled:
        # objectives and the engines' prefill rate in the router's clock: a simulated second is 2 s
        assert {c.name: c.ttft_objective_s for c in fc.classes} == {
            "interactive": 2.0,
            "default": 2.0,
            "batch": None,
        }
        assert (fc.saturation.prefill_tokens_per_s, fc.saturation.prefill_target_s) == (1050.0, 1.0)
        assert [t.name for t in fc.tenants] == ["A", "B"]
