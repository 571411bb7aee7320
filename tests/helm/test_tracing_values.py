"""Tracing values: the router's config and the engines' flags the chart renders, read by the real loaders."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.helm.conftest import HelmChart
from tests.helm.test_engine_config import load_pod_config
from tests.helm.test_router_config import load_router

from kvstack.engine.serve.config import EngineConfig
from kvstack.engine.serve.render import render

COLLECTOR = "http://otel-collector.monitoring:4318"
ENGINE_URL = f"{COLLECTOR}/v1/traces"


def test_router_tracing_values_reach_the_router_settings(
    chart: HelmChart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = tmp_path / "tracing.yaml"  # a file: helm's --set reads 0.25 as a string
    values.write_text(
        "router:\n  tracing:\n    enabled: true\n"
        f"    endpoint: {COLLECTOR}\n    serviceName: edge-router\n    sampleRatio: 0.25\n"
        "    headers:\n      x-tenant: team-a\n"
    )
    rendered = chart.template([values])
    tracing = load_router(rendered, tmp_path, monkeypatch).tracing
    assert (tracing.enabled, tracing.endpoint, tracing.service_name) == (True, COLLECTOR, "edge-router")
    assert (tracing.sample_ratio, tracing.headers) == (0.25, {"x-tenant": "team-a"})


def test_router_tracing_is_off_by_default(
    chart: HelmChart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = chart.template()
    assert "tracing" not in rendered.one("ConfigMap", "-router")["data"]["router.yaml"]
    assert load_router(rendered, tmp_path, monkeypatch).tracing.enabled is False
    for engine in rendered.engines():
        assert (
            "--otlp-traces-endpoint"
            not in render(load_pod_config(rendered, engine, tmp_path, monkeypatch)).argv
        )


@pytest.mark.parametrize(
    ("values", "error"),
    [
        (["router.tracing.enabled=true"], "endpoint"),
        (["router.tracing.enabled=true", "router.tracing.endpoint=collector:4318"], "endpoint"),
        (["router.tracing.sampleRatio=2"], "sampleRatio"),
        (["engines.tracing.endpoint=grpc-collector:4317"], "endpoint"),
        (["engines.tracing.protocol=thrift"], "protocol"),
    ],
)
def test_schema_rejects_bad_tracing_values(chart: HelmChart, values: list[str], error: str) -> None:
    assert error in chart.template_error(set_values=values)


def test_engine_tracing_renders_vllm_flag_and_protocol(
    chart: HelmChart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = chart.template(set_values=[f"engines.tracing.endpoint={ENGINE_URL}"])
    engines = rendered.engines()
    assert engines
    for engine in engines:
        spec = render(load_pod_config(rendered, engine, tmp_path, monkeypatch))
        i = spec.argv.index("--otlp-traces-endpoint")
        assert spec.argv[i + 1] == ENGINE_URL
        assert spec.env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"


def test_simulator_mode_passes_the_endpoint_to_the_simulator(chart: HelmChart) -> None:
    rendered = chart.template(
        set_values=["engines.simulator.enabled=true", f"engines.tracing.endpoint={ENGINE_URL}"]
    )
    for engine in rendered.engines():
        (container,) = engine["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["kvstack", "engine", "sim"]
        i = container["args"].index("--otlp-traces-endpoint")
        assert container["args"][i + 1] == ENGINE_URL


def test_engine_config_treats_an_empty_endpoint_as_none() -> None:
    config = EngineConfig(model="m", otlp_traces_endpoint="")  # an environment variable's "unset"
    assert config.otlp_traces_endpoint is None
    assert "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL" not in render(config).env


def test_engine_extras_cannot_set_tracing_behind_the_fields() -> None:
    with pytest.raises(ValueError, match="--otlp-traces-endpoint"):
        EngineConfig(model="m", extra_args=["--otlp-traces-endpoint", ENGINE_URL])
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        EngineConfig(model="m", extra_env={"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"})
    with pytest.raises(ValueError, match="otlp_traces_endpoint"):
        EngineConfig(model="m", otlp_traces_endpoint="collector:4317")
