"""The ``flow_control`` configuration block: its defaults, its layers, and errors naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvstack.common.config import ConfigError
from kvstack.router.config import load_settings

INTERACTIVE = {"name": "interactive", "priority": 10, "ttft_objective_s": 1.0}
BATCH = {"name": "batch", "priority": 0}


def test_on_by_default_with_one_fcfs_class() -> None:
    flow = load_settings().flow_control
    assert flow.enabled
    assert [(c.name, c.priority, c.ttft_objective_s) for c in flow.classes] == [("default", 0, None)]
    assert flow.for_model("any").ordering == "fcfs"
    assert (flow.tenant_header, flow.priority_header) == ("x-kvstack-tenant", "x-kvstack-priority")


def test_from_a_file_with_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "router.yaml"
    cfg.write_text(
        "flow_control:\n"
        "  default_class: batch\n"
        "  tenant_header: X-Team\n"
        "  classes:\n"
        "    - {name: interactive, priority: 10, ttft_objective_s: 1.0}\n"
        "    - {name: batch, priority: 0}\n"
        "  models:\n"
        "    - {model: '*', ordering: edf, max_queue: 64}\n"
        "    - {model: m1, ordering: cheapest, max_queue_tokens: 1000}\n"
        "  tenants:\n"
        "    - {name: team-a, weight: 3, default_class: interactive}\n"
    )
    monkeypatch.setenv("KVSTACK_ROUTER_FLOW_CONTROL__ENABLED", "false")
    flow = load_settings(cfg).flow_control
    assert not flow.enabled
    assert flow.tenant_header == "x-team"  # header names are matched lower-case
    assert flow.for_model("m1").ordering == "cheapest" and flow.for_model("m1").max_queue_tokens == 1000
    assert flow.for_model("m2").ordering == "edf" and flow.for_model("m2").max_queue == 64
    assert flow.tenants[0].weight == 3 and flow.tenants[0].default_class == "interactive"


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ({"default_class": "gold"}, r"flow_control: default_class: 'gold' is not one of classes"),
        ({"classes": []}, "at least one priority class"),
        ({"classes": [INTERACTIVE, INTERACTIVE], "default_class": "interactive"}, "classes: duplicate"),
        ({"classes": [{"name": "x", "ttft_objective_s": 0}]}, r"flow_control\.classes\.0\.ttft_objective_s"),
        ({"classes": [{"name": "bad name"}]}, r"flow_control\.classes\.0\.name"),
        ({"models": [{"model": "m", "ordering": "lifo"}]}, r"flow_control\.models\.0\.ordering"),
        ({"models": [{"max_queue": -1}]}, r"flow_control\.models\.0\.max_queue"),
        ({"models": [{"model": "m"}, {"model": "m"}]}, "models: duplicate"),
        ({"tenants": [{"name": "a", "weight": 0}]}, r"flow_control\.tenants\.0\.weight"),
        ({"tenants": [{"name": "a", "default_class": "gold"}]}, r"tenants\.0\.default_class: 'gold'"),
        ({"tenants": [{"name": "a"}, {"name": "a"}]}, "tenants: duplicate"),
        ({"tenant_header": "x y"}, r"flow_control\.tenant_header"),
        ({"tenant_header": "x-p", "priority_header": "X-P"}, "must differ"),
        ({"saturation": {"max_kv_usage": 1.5}}, r"flow_control\.saturation\.max_kv_usage"),
        ({"saturation": {"prefill_tokens_per_s": 0}}, r"saturation\.prefill_tokens_per_s"),
        ({"surprise": 1}, r"flow_control\.surprise"),
    ],
)
def test_bad_blocks_fail_naming_the_field(block: dict[str, Any], field: str) -> None:
    if "classes" in block and "default_class" not in block and block["classes"]:
        block = {**block, "default_class": block["classes"][0]["name"]}
    with pytest.raises(ConfigError, match=field):
        load_settings(flow_control=block)
