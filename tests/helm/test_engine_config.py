"""The real `kvstack engine serve` loader accepts every engine config the chart renders."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from tests.helm.conftest import HelmChart, Rendered, load_values, values_files

from kvstack.engine.serve.config import ENV_PREFIX, EngineConfig, load_config

VALUES = values_files()
# Stand-ins for what Secrets hold at run time.
SECRET_SAMPLES = {
    "KVSTACK_ENGINE_LMCACHE__REMOTE_URL": "rediss://:s3cret@redis.example.com:6380",
    "KVSTACK_ENGINE_API_KEY": "engine-key",
    "REDIS_PASSWORD": "generatedpassword",
    "HF_TOKEN": "hf_token",
    "WANDB_API_KEY": "wandb-key",  # values/platform.yaml's env from a Secret
}


def declared_lora(values: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``lora`` block the values give model ``name``, over engines.defaults' (empty when none)."""
    engines = values.get("engines", {})
    defaults = engines.get("defaults", {}).get("lora") or {}
    for model in engines.get("models", []):
        if model["name"] == name:
            return {**defaults, **(model.get("lora") or {})}
    return {}


def pod_environment(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: Secrets filled in, $(VAR) expanded."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            # Kubernetes expands $(NAME) from variables defined earlier in the list.
            env[item["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"]
            )
        else:
            env[item["name"]] = SECRET_SAMPLES[item["name"]]
    return env


def load_pod_config(
    rendered: Rendered, deployment: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> EngineConfig:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["kvstack", "engine", "serve"]
    assert container["args"] == ["--config", "/etc/kvstack/engine.yaml"]
    model = deployment["metadata"]["labels"]["kvstack.dev/model"]
    config_file = tmp_path / f"{model}.yaml"
    config_file.write_text(rendered.one("ConfigMap", f"-engine-{model}")["data"]["engine.yaml"])
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in pod_environment(container).items():
        monkeypatch.setenv(name, value)
    return load_config(config_file)


@pytest.mark.parametrize("values", VALUES, ids=[p.stem for p in VALUES])
def test_engine_serve_accepts_every_rendered_config(
    values: Path, chart: HelmChart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = chart.template([values])
    for deployment in rendered.engines():
        config = load_pod_config(rendered, deployment, tmp_path, monkeypatch)
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert config.port == ports["http"]
        if config.kv_events.enabled:
            assert config.kv_events.endpoint == f"tcp://*:{ports['kv-events']}"
            assert config.kv_events.replay_endpoint == f"tcp://*:{ports['kv-replay']}"
        else:
            assert "kv-events" not in ports
        gpus = sum(int(v) for k, v in container["resources"]["limits"].items() if "gpu" in k)
        assert config.tensor_parallel_size == max(gpus, 1)
        # LoRA limits reach the engine as its lora section (values/lora.yaml has some); none without
        lora = declared_lora(load_values(values), deployment["metadata"]["labels"]["kvstack.dev/model"])
        if lora.get("enabled"):
            assert config.lora is not None
            assert config.lora.max_loras == lora.get("maxLoras", 1)
            assert config.lora.max_lora_rank == lora.get("maxLoraRank", 16)
            assert config.lora.max_cpu_loras == (lora.get("maxCpuLoras") or None)
        else:
            assert config.lora is None


def test_the_engine_reaches_the_charts_redis_with_its_password(
    chart: HelmChart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = chart.template()
    (deployment,) = rendered.engines()
    config = load_pod_config(rendered, deployment, tmp_path, monkeypatch)
    assert config.lmcache.remote_url == "redis://:generatedpassword@rel-kvstack-redis.kvstack.svc:6379"
    assert config.python_hash_seed == "0"


def test_external_secret_url_and_api_key_reach_the_engine(
    chart: HelmChart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = chart.template([p for p in VALUES if p.stem == "external-redis"])
    for deployment in rendered.engines():
        config = load_pod_config(rendered, deployment, tmp_path, monkeypatch)
        assert config.lmcache.remote_url == SECRET_SAMPLES["KVSTACK_ENGINE_LMCACHE__REMOTE_URL"]
        assert config.api_key is not None and config.api_key.get_secret_value() == "engine-key"
        assert config.python_hash_seed == "12345"


def test_no_shared_store_means_no_remote_url(
    chart: HelmChart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = chart.template([p for p in VALUES if p.stem == "minimal"])
    (deployment,) = rendered.engines()
    config = load_pod_config(rendered, deployment, tmp_path, monkeypatch)
    assert config.lmcache.remote_url is None
    assert not config.kv_events.enabled
