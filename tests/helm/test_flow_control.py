"""router.flowControl in the chart becomes the router's flow_control, checked by the real router loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tests.helm.conftest import HelmChart
from tests.helm.test_router_config import load_router

from kvstack.router.flow.config import FlowControlConfig

FLOW = """
router:
  flowControl:
    tenantHeader: x-team
    defaultClass: standard
    classes:
      - {name: interactive, priority: 10, ttftObjectiveSeconds: 1.0}
      - {name: standard, priority: 5, ttftObjectiveSeconds: 3}
      - {name: batch}
    models:
      - {model: "*", ordering: edf, maxQueue: 64}
      - {model: meta-llama/Llama-3.1-8B-Instruct, ordering: cheapest}
    tenants:
      - {name: search, weight: 3, defaultClass: interactive}
      - {name: etl}
    saturation: {prefillTokensPerSecond: 20000, maxKvUsage: 0.9, maxWaiting: 2, lowerClassShare: 0.25,
                 headroomWindowSeconds: 30, overloadMemorySeconds: 0.5}
"""


def test_defaults_render_the_routers_defaults(
    chart: HelmChart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_router(chart.template(), tmp_path, monkeypatch)
    assert settings.flow_control == FlowControlConfig()


def test_a_full_section_reaches_the_router(
    chart: HelmChart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = tmp_path / "flow.yaml"
    values.write_text(FLOW)
    fc = load_router(chart.template([values]), tmp_path, monkeypatch).flow_control
    assert (fc.enabled, fc.tenant_header, fc.priority_header, fc.default_class) == (
        True,
        "x-team",
        "x-kvstack-priority",
        "standard",
    )
    assert [(c.name, c.priority, c.ttft_objective_s) for c in fc.classes] == [
        ("interactive", 10, 1.0),
        ("standard", 5, 3.0),
        ("batch", 0, None),
    ]
    assert [(m.model, m.ordering, m.max_queue) for m in fc.models] == [
        ("*", "edf", 64),
        ("meta-llama/Llama-3.1-8B-Instruct", "cheapest", 1024),
    ]
    assert fc.for_model("other").ordering == "edf"
    assert [(t.name, t.weight, t.default_class) for t in fc.tenants] == [
        ("search", 3.0, "interactive"),
        ("etl", 1.0, None),
    ]
    sat = fc.saturation
    assert (sat.prefill_tokens_per_s, sat.max_kv_usage, sat.max_waiting, sat.learn_weight) == (
        20000,
        0.9,
        2,
        0.1,
    )
    assert (sat.lower_class_share, sat.headroom_window_s, sat.overload_memory_s) == (0.25, 30, 0.5)


@pytest.mark.parametrize(
    ("saturation", "share", "window"),
    [
        ("{}", 0.5, 10.0),  # the chart's defaults are the router's
        ("{lowerClassShare: 1}", 1.0, 10.0),  # no headroom at all
        ("{headroomWindowSeconds: 0}", 0.5, 0.0),
        ("{lowerClassShare: 0.75, headroomWindowSeconds: 2.5}", 0.75, 2.5),
    ],
)
def test_the_headroom_for_higher_classes_reaches_the_router(
    chart: HelmChart,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    saturation: str,
    share: float,
    window: float,
) -> None:
    values = tmp_path / "headroom.yaml"  # a file: --set would pass 0.75 as a string
    values.write_text(f"router:\n  flowControl:\n    saturation: {saturation}\n")
    sat = load_router(chart.template([values]), tmp_path, monkeypatch).flow_control.saturation
    assert (sat.lower_class_share, sat.headroom_window_s) == (share, window)


def test_off_reaches_the_router(chart: HelmChart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rendered = chart.template(set_values=["router.flowControl.enabled=false"])
    assert load_router(rendered, tmp_path, monkeypatch).flow_control.enabled is False
    config = yaml.safe_load(rendered.one("ConfigMap", "-router")["data"]["router.yaml"])
    assert config["flow_control"]["enabled"] is False


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["router.flowControl.defaultClass=gold"], 'router.flowControl.defaultClass: "gold" is not one of'),
        (
            ["router.flowControl.tenants[0].name=a", "router.flowControl.tenants[0].defaultClass=gold"],
            'router.flowControl.tenants[0].defaultClass: "gold" is not one of',
        ),
        (["router.flowControl.models[0].ordering=lifo"], "values don't meet the specifications"),
        (["router.flowControl.saturation.maxKvUsage=1.5"], "values don't meet the specifications"),
        (["router.flowControl.saturation.lowerClassShare=0"], "values don't meet the specifications"),
        (["router.flowControl.saturation.lowerClassShare=1.5"], "values don't meet the specifications"),
        (["router.flowControl.saturation.headroomWindowSeconds=-1"], "values don't meet the specifications"),
        (["router.flowControl.saturation.overloadMemorySeconds=-1"], "values don't meet the specifications"),
        (["router.flowControl.classes[0].ttftObjectiveSeconds=0"], "values don't meet the specifications"),
        (["router.flowControl.tenantHeader=x team"], "values don't meet the specifications"),
        (["router.flowControl.clases=x"], "values don't meet the specifications"),
    ],
)
def test_bad_sections_fail_the_install(chart: HelmChart, bad: list[str], message: str) -> None:
    assert message in chart.template_error(set_values=bad)
