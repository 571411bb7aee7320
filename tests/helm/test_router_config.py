"""The real `kvstack router` settings loader accepts the router config the chart renders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from tests.helm.conftest import CHART, HelmChart, Rendered, load_values, values_files

from kvstack.common.config import ConfigError
from kvstack.router.config import RouterSettings, load_settings
from kvstack.router.policies import policy_names

VALUES = values_files()
SECRET_SAMPLES = {
    "KVSTACK_ROUTER_API_KEYS": "sk-one,sk-two",
    "KVSTACK_ROUTER_ENGINE_API_KEY": "engine-key",
    "KVSTACK_ROUTER_MONITOR__API_KEY": "engine-key",
}


def declared_adapters(values: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(name, model, source) of every adapter the values declare, with its model's first served name."""
    engines = values.get("engines", {})
    defaults = engines.get("defaults", {}).get("lora") or {}
    out = []
    for model in engines.get("models", []):
        lora = {**defaults, **(model.get("lora") or {})}
        served = (model.get("servedModelNames") or [model["model"]])[0]
        if lora.get("enabled"):
            out += [(a["name"], served, a["source"]) for a in lora.get("adapters", [])]
    return out


def load_router(rendered: Rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RouterSettings:
    deployment = rendered.one("Deployment", "-router")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["--config", "/etc/kvstack/router.yaml"]
    config_file = tmp_path / "router.yaml"
    config_file.write_text(rendered.one("ConfigMap", "-router")["data"]["router.yaml"])
    for name in list(os.environ):
        if name.upper().startswith("KVSTACK_ROUTER_"):
            monkeypatch.delenv(name)
    for item in container.get("env", []):
        monkeypatch.setenv(item["name"], item.get("value") or SECRET_SAMPLES[item["name"]])
    return load_settings(config_file)


@pytest.mark.parametrize("values", VALUES, ids=[p.stem for p in VALUES])
def test_router_accepts_every_rendered_config(
    values: Path, chart: HelmChart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = chart.template([values])
    settings = load_router(rendered, tmp_path, monkeypatch)
    (container,) = rendered.one("Deployment", "-router")["spec"]["template"]["spec"]["containers"]
    assert settings.host == "0.0.0.0"
    assert settings.port == container["ports"][0]["containerPort"]
    assert settings.discovery == "kubernetes"
    assert settings.kubernetes.namespace == "kvstack"
    assert settings.policy in policy_names()
    auth_on = any(e["name"] == "KVSTACK_ROUTER_API_KEYS" for e in container.get("env", []))
    assert [k.get_secret_value() for k in settings.api_keys] == (["sk-one", "sk-two"] if auth_on else [])
    # the declared LoRA adapters reach the router as its adapters block (values/lora.yaml has some)
    adapters = [(a.name, a.model, a.source) for a in settings.adapters]
    assert adapters == declared_adapters(load_values(values))


def test_engine_api_key_reaches_proxy_and_monitor(
    chart: HelmChart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_router(
        chart.template([p for p in VALUES if p.stem == "external-redis"]), tmp_path, monkeypatch
    )
    assert settings.engine_api_key is not None and settings.engine_api_key.get_secret_value() == "engine-key"
    assert (
        settings.monitor.api_key is not None and settings.monitor.api_key.get_secret_value() == "engine-key"
    )


def test_extra_config_reaches_the_router_and_is_checked(
    chart: HelmChart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = chart.template(
        set_values=["router.extraConfig.rate_limit_rps=50", "router.extraConfig.kubernetes.watch_timeout=60"]
    )
    settings = load_router(rendered, tmp_path, monkeypatch)
    assert settings.rate_limit_rps == 50
    assert settings.kubernetes.watch_timeout == 60
    assert settings.kubernetes.port_name == "http"  # merged, not replaced
    typo = chart.template(set_values=["router.extraConfig.rate_limit_rsp=50"])
    with pytest.raises(ConfigError, match="rate_limit_rsp"):
        load_router(typo, tmp_path, monkeypatch)


def test_the_schema_offers_exactly_the_routers_policies() -> None:
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    offered = schema["properties"]["router"]["properties"]["routing"]["properties"]["policy"]["enum"]
    assert sorted(offered) == sorted(policy_names())


def test_edge_limits_and_metrics_port_reach_the_router(
    chart: HelmChart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """router.limits and router.metricsPort become the router's settings; /metrics has its own
    container, Service and ServiceMonitor port, which the Ingress (the API port) does not reach."""
    rendered = chart.template(
        set_values=[
            "router.limits.maxHeaderBytes=16384",
            "router.limits.headerTimeoutSeconds=5",
            "router.limits.maxBufferedBodyBytes=1073741824",
            "router.metricsPort=9191",
            "monitoring.serviceMonitor.enabled=true",
        ]
    )
    settings = load_router(rendered, tmp_path, monkeypatch)
    assert settings.max_header_bytes == 16384 and settings.header_timeout_s == 5
    assert settings.max_buffered_body_bytes == 1 << 30
    assert settings.max_client_connections == 4096 and settings.max_response_bytes == 64 << 20  # defaults
    assert settings.metrics_port == 9191
    (container,) = rendered.one("Deployment", "-router")["spec"]["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000, "metrics": 9191}
    service_ports = {p["name"]: p["targetPort"] for p in rendered.one("Service", "-router")["spec"]["ports"]}
    assert service_ports == {"http": "http", "metrics": "metrics"}
    assert rendered.one("ServiceMonitor", "-router")["spec"]["endpoints"][0]["port"] == "metrics"


@pytest.mark.parametrize(
    "bad",
    [
        "router.limits.maxHeaderBytes=100",
        "router.limits.headerTimeoutSeconds=0",
        "router.limits.maxConnectoins=5",
        "router.metricsPort=70000",
        "router.extraConfig.max_header_bytes=1",
    ],
)
def test_bad_edge_limits_are_refused_by_the_schema(chart: HelmChart, bad: str) -> None:
    assert "values don't meet the specifications" in chart.template_error(set_values=[bad])


def test_buffered_bodies_below_one_body_fail_at_start(
    chart: HelmChart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = chart.template(
        set_values=["router.limits.maxBodyBytes=8388608", "router.limits.maxBufferedBodyBytes=4194304"]
    )
    with pytest.raises(ConfigError, match="max_buffered_body_bytes"):
        load_router(rendered, tmp_path, monkeypatch)


def test_local_tokenizer_mounts_the_model_files_it_reads(
    chart: HelmChart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = ["router.routing.tokenizer=local"]
    claim = ["router.routing.tokenizerFiles.volume.persistentVolumeClaim.claimName=models"]
    assert "needs router.routing.tokenizerFiles.volume" in chart.template_error(set_values=local)
    rendered = chart.template(set_values=[*local, *claim])
    pod = rendered.one("Deployment", "-router")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tokenizers")
    volume = next(v for v in pod["volumes"] if v["name"] == "tokenizers")
    assert (mount["mountPath"], mount["readOnly"]) == ("/tokenizers", True)
    assert volume["persistentVolumeClaim"] == {"claimName": "models"}
    # the loader checks the folder exists: stand one in where the pod mounts it
    config = rendered.one("ConfigMap", "-router")["data"]["router.yaml"]
    assert "tokenizer_path: /tokenizers/huggingface/hub" in config
    here = tmp_path / "hub"
    here.mkdir()
    cm = rendered.one("ConfigMap", "-router")
    cm["data"]["router.yaml"] = config.replace("/tokenizers/huggingface/hub", str(here))
    settings = load_router(rendered, tmp_path, monkeypatch)
    assert (settings.tokenizer, settings.tokenizer_path) == ("local", here)


@pytest.mark.parametrize(
    ("set_values", "from_gpu"),
    [
        ((), True),  # LMCache on, sharing the chart's Redis: what one engine prefills, others load
        (("lmcache.remote.mode=none",), False),  # no shared store
        (("engines.defaults.lmcache.shareRemote=false",), False),  # a store the engines do not use
        (("engines.defaults.lmcache.enabled=false",), False),  # plain vLLM
    ],
)
def test_the_router_knows_when_the_engines_write_through_to_a_shared_store(
    set_values: tuple[str, ...],
    from_gpu: bool,
    chart: HelmChart,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_router(chart.template(set_values=set_values), tmp_path, monkeypatch)
    assert settings.cache_aware.index.shared_store_from_gpu is from_gpu
