"""The CRD generated from the spec models, and the pure builders of the objects a stack owns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kvstack.common.config import ConfigError
from kvstack.engine.serve.config import load_config
from kvstack.operator import crd
from kvstack.operator.annotated import AUTOSCALING, wants_autoscaling
from kvstack.operator.ownership import Owner, key, managed_selector, to_prune
from kvstack.operator.resources import desired_objects, engine_config, router_settings
from kvstack.operator.spec import parse_spec
from kvstack.router.config import RouterSettings

OWNER = Owner(name="demo", namespace="serving", uid="1234-5678")
SPEC = {"models": [{"name": "llama", "model": "meta-llama/Llama-3.1-8B-Instruct", "gpus": 2}]}


def objects(spec: dict[str, Any] = SPEC) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in desired_objects(OWNER, parse_spec(spec))}


def _walk(node: Any) -> Any:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_crd_file_is_generated_from_the_models() -> None:
    assert crd.CRD_FILE.read_text() == crd.render(), "run: python -m kvstack.operator.crd"
    assert crd.main(["--check"]) == 0


def test_crd_schema_is_structural() -> None:
    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for node in _walk(schema):
        assert not {"$ref", "anyOf", "title", "$defs"} & node.keys(), node
        assert node.get("additionalProperties") is not False
        if "properties" in node or "items" in node:
            assert "type" in node or "x-kubernetes-preserve-unknown-fields" in node, node


def test_crd_defaults_are_the_models_defaults() -> None:
    props = crd.spec_schema()["properties"]
    auto = props["autoscaling"]["properties"]
    assert auto["intervalSeconds"]["default"] == 15
    assert auto["scaleDown"]["properties"]["stabilizationSeconds"]["default"] == 300
    assert auto["scaleUp"]["properties"]["maxPods"]["default"] == 4
    # A whole section's default, so nested defaults apply to an empty resource (and pass CEL rules).
    assert props["autoscaling"]["default"]["scaleDown"] == {"stabilizationSeconds": 300, "maxPods": 1}
    assert props["cache"]["default"]["mode"] == "internal"
    model = props["models"]["items"]
    assert model["properties"]["minReplicas"]["default"] == 1
    rules = [r["rule"] for r in model["x-kubernetes-validations"]]
    assert "self.minReplicas <= self.maxReplicas" in rules
    assert props["models"]["x-kubernetes-list-map-keys"] == ["name"]


def test_spec_defaults_and_rejections() -> None:
    spec = parse_spec(SPEC)
    assert spec.autoscaling.effective_target == 5.0
    assert spec.models[0].served_names == ["meta-llama/Llama-3.1-8B-Instruct"]
    with pytest.raises(ConfigError, match="models"):
        parse_spec({"models": []})
    with pytest.raises(ConfigError, match=r"autoscaling\.metric"):
        parse_spec({**SPEC, "autoscaling": {"metric": "cpu"}})
    with pytest.raises(ConfigError, match=r"lmcache\.pinTimeoutSec"):
        parse_spec({"models": [{**SPEC["models"][0], "lmcache": {"pinTimeoutSec": 0}}]})


def test_every_object_is_owned_and_labelled() -> None:
    objs = desired_objects(OWNER, parse_spec(SPEC))
    assert {o["kind"] for o in objs} >= {"Deployment", "Service", "ConfigMap", "Role", "RoleBinding"}
    for obj in objs:
        meta = obj["metadata"]
        assert meta["namespace"] == "serving"
        (ref,) = meta["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"]) == ("KVStack", "demo", "1234-5678")
        assert ref["controller"] is True
        assert meta["labels"]["app.kubernetes.io/instance"] == "demo"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kvstack-operator"
    selector = managed_selector(OWNER)
    assert selector == "app.kubernetes.io/instance=demo,app.kubernetes.io/managed-by=kvstack-operator"


def test_engine_pods_carry_the_chart_labels_and_named_ports() -> None:
    deploy = objects()[("Deployment", "demo-llama")]
    template = deploy["spec"]["template"]
    pod_labels = template["metadata"]["labels"]
    assert pod_labels["app.kubernetes.io/component"] == "engine"
    assert pod_labels["kvstack.dev/model"] == "llama"
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (container,) = template["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": 8000,
        "kv-events": 5557,
        "kv-replay": 5558,
    }
    assert container["command"] == ["kvstack", "engine", "serve"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "replicas" not in deploy["spec"]  # autoscaled: the autoscaler owns it


def test_a_stacks_engines_scale_with_the_stack_not_by_annotation() -> None:
    # Even annotated by hand (pod annotations, a mutating webhook), the owner reference keeps a
    # stack's engines out of the annotated-Deployment path: one autoscaler per Deployment.
    spec = {**SPEC, "models": [{**SPEC["models"][0], "podAnnotations": {AUTOSCALING: "true"}}]}
    deploy = objects(spec)[("Deployment", "demo-llama")]
    assert not wants_autoscaling(deploy["metadata"])
    assert not wants_autoscaling({**deploy["metadata"], "annotations": {AUTOSCALING: "true"}})


def test_fixed_replicas_without_autoscaling() -> None:
    spec = {**SPEC, "autoscaling": {"enabled": False}}
    spec["models"] = [{**SPEC["models"][0], "replicas": 3}]
    assert objects(spec)[("Deployment", "demo-llama")]["spec"]["replicas"] == 3


def test_engine_configmap_loads_with_the_real_engine_loader(tmp_path: Path) -> None:
    cm = objects()[("ConfigMap", "demo-llama")]
    path = tmp_path / "engine.yaml"
    path.write_text(cm["data"]["engine.yaml"])
    loaded = load_config(path)
    assert loaded == engine_config(OWNER, parse_spec(SPEC), parse_spec(SPEC).models[0])
    assert loaded.tensor_parallel_size == 2
    assert loaded.kv_events.enabled
    assert loaded.lmcache.remote_url == "redis://demo-redis.serving.svc:6379"


def test_lmcache_pin_timeout_reaches_the_engine_environment() -> None:
    spec = parse_spec({"models": [{**SPEC["models"][0], "lmcache": {"pinTimeoutSec": 45}}]})
    config = engine_config(OWNER, spec, spec.models[0])
    assert config.lmcache.pin_timeout_sec == 45
    default = parse_spec(SPEC)
    assert engine_config(OWNER, default, default.models[0]).lmcache.pin_timeout_sec == 300


def test_config_change_rolls_the_pods() -> None:
    before = objects()[("Deployment", "demo-llama")]["spec"]["template"]["metadata"]["annotations"]
    changed = {"models": [{**SPEC["models"][0], "maxModelLen": 4096}]}
    after = objects(changed)[("Deployment", "demo-llama")]["spec"]["template"]["metadata"]["annotations"]
    assert before["checksum/config"] != after["checksum/config"]
    assert objects() == objects()  # same spec, same objects: applying again changes nothing


def test_external_cache_from_a_secret_reaches_the_pod_as_env_not_in_the_config() -> None:
    spec = {**SPEC, "cache": {"mode": "external", "urlSecretRef": {"name": "kv", "key": "url"}}}
    objs = objects(spec)
    assert ("Deployment", "demo-redis") not in objs
    assert "remote_url" not in objs[("ConfigMap", "demo-llama")]["data"]["engine.yaml"]
    env = objs[("Deployment", "demo-llama")]["spec"]["template"]["spec"]["containers"][0]["env"]
    remote = next(e for e in env if e["name"] == "KVSTACK_ENGINE_LMCACHE__REMOTE_URL")
    assert remote["valueFrom"]["secretKeyRef"] == {"name": "kv", "key": "url"}


def test_a_bad_model_fails_naming_the_field() -> None:
    spec = {"models": [{**SPEC["models"][0], "args": ["--max-model-len", "10"]}]}
    with pytest.raises(ConfigError, match="extra_args"):
        desired_objects(OWNER, parse_spec(spec))


def test_router_config_is_valid_and_selects_the_engine_pods() -> None:
    settings = RouterSettings(**router_settings(OWNER, parse_spec(SPEC)))
    assert settings.discovery == "kubernetes"
    assert settings.kubernetes.namespace == "serving"
    pod_labels = objects()[("Deployment", "demo-llama")]["spec"]["template"]["metadata"]["labels"]
    wanted = dict(term.split("=") for term in settings.kubernetes.label_selector.split(","))
    assert wanted.items() <= pod_labels.items()
    router = objects()[("Deployment", "demo-router")]["spec"]["template"]["metadata"]["labels"]
    assert not wanted.items() <= router.items()
    cm = objects()[("ConfigMap", "demo-router")]
    assert yaml.safe_load(cm["data"]["router.yaml"])["policy"] == "cache_aware"


@pytest.mark.parametrize(
    ("cache", "lmcache", "from_gpu"),
    [
        ({}, {}, True),  # the internal Redis, LMCache sharing it: the default
        ({"mode": "none"}, {}, False),
        ({}, {"shareRemote": False}, False),
        ({}, {"enabled": False}, False),
    ],
)
def test_the_router_knows_when_the_engines_write_through_to_a_shared_store(
    cache: dict[str, Any], lmcache: dict[str, Any], from_gpu: bool
) -> None:
    spec = {"models": [{**SPEC["models"][0], "lmcache": lmcache}], "cache": cache}
    settings = RouterSettings(**router_settings(OWNER, parse_spec(spec)))
    assert settings.cache_aware.index.shared_store_from_gpu is from_gpu


@pytest.mark.parametrize(
    ("existing", "pruned"),
    [
        ([], []),
        ([("apps/v1", "Deployment", "demo-llama")], []),
        (
            [("apps/v1", "Deployment", "demo-old"), ("v1", "ConfigMap", "demo-old")],
            [("apps/v1", "Deployment", "demo-old"), ("v1", "ConfigMap", "demo-old")],
        ),
        ([("apps/v1", "Deployment", "demo-redis")], []),
    ],
)
def test_prune_removes_what_the_spec_no_longer_asks_for(
    existing: list[tuple[str, str, str]], pruned: list[tuple[str, str, str]]
) -> None:
    assert to_prune(existing, desired_objects(OWNER, parse_spec(SPEC))) == pruned


def test_keys_are_unique() -> None:
    objs = desired_objects(OWNER, parse_spec({"models": [SPEC["models"][0], {"name": "b", "model": "m"}]}))
    assert len({key(o) for o in objs}) == len(objs)
