"""Day-one knobs of a platform team: storage that binds, GitOps-stable output, env from Secrets,
init containers, extra volumes, monitor relabelings and operator scheduling (values/platform.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.helm.conftest import VALUES_DIR, HelmChart, Rendered, Validate

PLATFORM = VALUES_DIR / "platform.yaml"


@pytest.fixture(scope="module")
def platform(chart: HelmChart) -> Rendered:
    return chart.template([PLATFORM])


def _engine(rendered: Rendered, model: str) -> dict[str, Any]:
    return rendered.one("Deployment", f"-engine-{model}")["spec"]["template"]["spec"]


def _values(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_the_model_cache_defaults_to_a_claim_any_default_class_binds(chart: HelmChart) -> None:
    rendered = chart.template(set_values=["engines.defaults.modelCache.enabled=true"])
    claim = rendered.one("PersistentVolumeClaim", "-engine-llama-8b-models")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "storageClassName" not in claim["spec"]  # the cluster's default class


def test_shared_model_cache_is_one_setting_away(chart: HelmChart) -> None:
    rendered = chart.template(
        set_values=[
            "engines.defaults.modelCache.enabled=true",
            "engines.defaults.modelCache.accessModes={ReadWriteMany}",
            "engines.defaults.modelCache.storageClass=efs",
        ]
    )
    claim = rendered.one("PersistentVolumeClaim", "-engine-llama-8b-models")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "efs"


def test_with_existing_secrets_the_output_is_stable_for_gitops(chart: HelmChart, platform: Rendered) -> None:
    # Argo CD and Flux render with `helm template`: no lookup, so only existingSecret is stable.
    assert platform.of_kind("Secret") == []
    assert chart.template([PLATFORM]).text == platform.text
    router = platform.one("Deployment", "-router")["spec"]["template"]["spec"]["containers"][0]
    refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in router.get("env", []) if "valueFrom" in e]
    assert "router-keys" in refs
    redis_ref = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in _engine(platform, "llama-8b")["containers"][0]["env"]
        if "valueFrom" in e
    }
    assert redis_ref["REDIS_PASSWORD"] == "redis-creds"


def test_generated_secrets_change_on_every_template(chart: HelmChart) -> None:
    # Why the values tell GitOps users to set existingSecret: without a live Secret to look up,
    # each render makes new credentials.
    args = ["auth.enabled=true"]
    first, second = chart.template(set_values=args), chart.template(set_values=args)
    assert first.one("Secret")["data"] != second.one("Secret")["data"]


def test_env_and_env_from_reach_each_models_engine(platform: Rendered) -> None:
    llama = _engine(platform, "llama-8b")["containers"][0]
    qwen = _engine(platform, "qwen-7b")["containers"][0]
    assert {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}} in (
        llama["env"]
    )
    assert "PYTHONHASHSEED" in {e["name"] for e in llama["env"]}  # the chart's own env stays
    names = {e["name"] for e in qwen["env"]}
    assert "HF_HUB_OFFLINE" in names and "WANDB_API_KEY" not in names  # lists replace per model
    assert llama["envFrom"] == [
        {"secretRef": {"name": "engine-env"}},
        {"configMapRef": {"name": "engine-settings"}, "prefix": "CFG_"},
    ]


def test_an_env_var_the_chart_sets_is_rejected_by_name(chart: HelmChart, tmp_path: Path) -> None:
    values = {
        "engines": {"models": [{"name": "m", "model": "o/m", "env": [{"name": "HF_TOKEN", "value": "x"}]}]}
    }
    error = chart.template_error([_values(tmp_path, values)])
    assert "engines.models[m].env: HF_TOKEN is set by the chart" in error


def test_init_containers_and_extra_volumes(platform: Rendered) -> None:
    spec = _engine(platform, "llama-8b")
    assert [c["name"] for c in spec["initContainers"]] == ["fetch-weights"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["ca-bundle"] == {"name": "ca-bundle", "configMap": {"name": "corporate-ca"}}
    assert {"config", "dshm", "tmp", "cache", "models"} <= set(volumes)
    mounts = spec["containers"][0]["volumeMounts"]
    assert {"name": "ca-bundle", "mountPath": "/etc/ssl/corporate", "readOnly": True} in mounts


def test_an_extra_volume_may_not_take_a_chart_volume_name(chart: HelmChart, tmp_path: Path) -> None:
    values = {"engines": {"defaults": {"extraVolumes": [{"name": "models", "emptyDir": {}}]}}}
    error = chart.template_error([_values(tmp_path, values)])
    assert "/engines/defaults/extraVolumes/0" in error


def test_monitor_relabelings_follow_the_charts_own(platform: Rendered) -> None:
    (endpoint,) = platform.one("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["relabelings"][0]["targetLabel"] == "kvstack_component"
    assert endpoint["relabelings"][-1] == {"targetLabel": "cluster", "replacement": "prod-eu"}
    assert endpoint["metricRelabelings"] == [
        {"sourceLabels": ["__name__"], "regex": "go_.*", "action": "drop"}
    ]
    for monitor in platform.of_kind("PodMonitor"):
        (pod_endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        targets = [r.get("targetLabel") for r in pod_endpoint["relabelings"]]
        assert targets[0] == "kvstack_component" and targets[-1] == "cluster"
        assert pod_endpoint["metricRelabelings"][0]["regex"] == "python_gc_.*"


def test_operator_scheduling(platform: Rendered) -> None:
    spec = platform.one("Deployment", "-operator")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"node-role.kubernetes.io/control-plane-tools": "true"}
    assert spec["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in spec["affinity"]


def test_simulator_mode_runs_kvstack_engine_sim_without_gpus(chart: HelmChart, kubeconform: Validate) -> None:
    rendered = chart.template(
        set_values=[
            "engines.simulator.enabled=true",
            "engines.apiKey.existingSecret=engine-key",
            "engines.defaults.runtimeClassName=nvidia",
            "engines.models[0].name=llama-8b",
            "engines.models[0].model=meta-llama/Llama-3.1-8B-Instruct",
            "engines.models[0].servedModelNames={llama}",
        ]
    )
    proc = kubeconform(rendered.text)
    assert proc.returncode == 0, proc.stdout
    spec = _engine(rendered, "llama-8b")
    (engine,) = spec["containers"]
    assert engine["image"] == "ghcr.io/kvstack/router:0.1.0"
    assert engine["command"] == ["kvstack", "engine", "sim"]
    args = engine["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--model") + 1] == "meta-llama/Llama-3.1-8B-Instruct"
    assert args[args.index("--served-model-name") + 1] == "llama"
    # Secrets reach the simulator through env the API server expands, never in the spec.
    assert args[args.index("--api-key") + 1] == "$(KVSTACK_ENGINE_API_KEY)"
    assert args[args.index("--lmcache-remote-url") + 1] == "$(KVSTACK_ENGINE_LMCACHE__REMOTE_URL)"
    assert "nvidia.com/gpu" not in yaml.safe_dump(engine["resources"])
    assert "runtimeClassName" not in spec


def test_without_simulator_mode_engines_run_vllm(platform: Rendered) -> None:
    (engine,) = _engine(platform, "llama-8b")["containers"]
    assert engine["command"] == ["kvstack", "engine", "serve"]
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 1
