"""The KVStack resource's router.flowControl: parsed, validated as the router would, rendered into the
router's config file, and refused by the API server's own schema when a class reference is wrong."""

from __future__ import annotations

from typing import Any

import pytest

from kvstack.common.config import ConfigError
from kvstack.operator import crd
from kvstack.operator.ownership import Owner
from kvstack.operator.resources import router_settings
from kvstack.operator.spec import FlowControl, parse_spec
from kvstack.router.config import RouterSettings
from kvstack.router.flow.config import FlowControlConfig

OWNER = Owner(name="demo", namespace="serving", uid="1234-5678")
MODELS = [{"name": "llama", "model": "meta-llama/Llama-3.1-8B-Instruct"}]


def spec(flow: dict[str, Any]) -> dict[str, Any]:
    return {"models": MODELS, "router": {"flowControl": flow}}


def test_defaults_are_the_routers() -> None:
    assert FlowControlConfig.model_validate(FlowControl().router_config()) == FlowControlConfig()


def test_a_full_section_reaches_the_router() -> None:
    flow = {
        "enabled": True,
        "tenantHeader": "x-team",
        "defaultClass": "standard",
        "classes": [
            {"name": "interactive", "priority": 10, "ttftObjectiveSeconds": 1.0},
            {"name": "standard", "priority": 5, "ttftObjectiveSeconds": 3},
            {"name": "batch"},
        ],
        "models": [{"model": "*", "ordering": "edf", "maxQueue": 64}],
        "tenants": [{"name": "search", "weight": 3, "defaultClass": "interactive"}, {"name": "etl"}],
        "saturation": {"prefillTokensPerSecond": 20000, "maxKvUsage": 0.9, "maxWaiting": 2},
    }
    settings = RouterSettings(**router_settings(OWNER, parse_spec(spec(flow))))
    fc = settings.flow_control
    assert (fc.tenant_header, fc.default_class) == ("x-team", "standard")
    assert [(c.name, c.priority, c.ttft_objective_s) for c in fc.classes] == [
        ("interactive", 10, 1.0),
        ("standard", 5, 3.0),
        ("batch", 0, None),
    ]
    assert (fc.models[0].ordering, fc.models[0].max_queue, fc.models[0].max_queue_tokens) == (
        "edf",
        64,
        4_000_000,
    )
    assert [(t.name, t.weight, t.default_class) for t in fc.tenants] == [
        ("search", 3.0, "interactive"),
        ("etl", 1.0, None),
    ]
    assert (fc.saturation.prefill_tokens_per_s, fc.saturation.max_kv_usage, fc.saturation.max_waiting) == (
        20000.0,
        0.9,
        2,
    )


@pytest.mark.parametrize(
    ("saturation", "share", "window"),
    [
        ({}, 0.5, 10.0),  # the router's defaults
        ({"lowerClassShare": 1}, 1.0, 10.0),  # no headroom for higher classes
        ({"lowerClassShare": 0.25, "headroomWindowSeconds": 30}, 0.25, 30.0),
        ({"headroomWindowSeconds": 0}, 0.5, 0.0),
    ],
)
def test_the_headroom_for_higher_classes_is_rendered(
    saturation: dict[str, float], share: float, window: float
) -> None:
    config = router_settings(OWNER, parse_spec(spec({"saturation": saturation})))
    sat = RouterSettings(**config).flow_control.saturation
    assert (sat.lower_class_share, sat.headroom_window_s) == (share, window)


@pytest.mark.parametrize(("saturation", "memory"), [({}, 2.0), ({"overloadMemorySeconds": 0}, 0.0)])
def test_the_overload_memory_is_rendered(saturation: dict[str, float], memory: float) -> None:
    config = router_settings(OWNER, parse_spec(spec({"saturation": saturation})))
    assert RouterSettings(**config).flow_control.saturation.overload_memory_s == memory


def test_the_crd_bounds_the_headroom() -> None:
    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    router = schema["properties"]["spec"]["properties"]["router"]["properties"]
    sat = router["flowControl"]["properties"]["saturation"]["properties"]
    share = sat["lowerClassShare"]  # OpenAPI v3: a boolean exclusiveMinimum beside the minimum
    assert (share["minimum"], share["exclusiveMinimum"], share["maximum"]) == (0, True, 1)
    assert sat["headroomWindowSeconds"]["minimum"] == 0
    assert sat["overloadMemorySeconds"]["minimum"] == 0


def test_disabled_renders_disabled() -> None:
    config = router_settings(OWNER, parse_spec(spec({"enabled": False})))
    assert RouterSettings(**config).flow_control.enabled is False


@pytest.mark.parametrize(
    ("flow", "message"),
    [
        ({"defaultClass": "gold"}, r"router\.flowControl.*default_class: 'gold' is not one of classes"),
        (
            {"tenants": [{"name": "a", "defaultClass": "gold"}]},
            r"router\.flowControl.*tenants\.0\.default_class: 'gold'",
        ),
        ({"classes": [{"name": "default"}, {"name": "default"}]}, r"classes: duplicate names \['default'\]"),
        ({"tenantHeader": "x-a", "priorityHeader": "x-a"}, "tenant_header and priority_header must differ"),
        ({"classes": []}, r"router\.flowControl\.classes"),
        ({"models": [{"ordering": "lifo"}]}, r"router\.flowControl\.models\.0\.ordering"),
        ({"saturation": {"maxKvUsage": 1.5}}, r"router\.flowControl\.saturation\.maxKvUsage"),
        ({"saturation": {"lowerClassShare": 0}}, r"router\.flowControl\.saturation\.lowerClassShare"),
        ({"saturation": {"lowerClassShare": 1.01}}, r"router\.flowControl\.saturation\.lowerClassShare"),
        (
            {"saturation": {"headroomWindowSeconds": -1}},
            r"router\.flowControl\.saturation\.headroomWindowSeconds",
        ),
        (
            {"saturation": {"overloadMemorySeconds": -1}},
            r"router\.flowControl\.saturation\.overloadMemorySeconds",
        ),
        ({"classes": [{"name": "a b"}], "defaultClass": "a b"}, r"router\.flowControl\.classes\.0\.name"),
        ({"clases": []}, r"router\.flowControl\.clases"),
    ],
)
def test_bad_sections_are_refused_naming_the_field(flow: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_spec(spec(flow))


def test_the_crd_checks_class_references_itself() -> None:
    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    flow = schema["properties"]["spec"]["properties"]["router"]["properties"]["flowControl"]
    rules = {r["rule"] for r in flow["x-kubernetes-validations"]}
    assert "self.classes.exists(c, c.name == self.defaultClass)" in rules
    assert flow["properties"]["classes"]["x-kubernetes-list-map-keys"] == ["name"]
    assert flow["properties"]["models"]["items"]["properties"]["ordering"]["enum"] == [
        "fcfs",
        "edf",
        "cheapest",
    ]
