"""The operator under KopfRunner against the real API server: create, edit, drift, delete, reject."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from kvstack.common.kube import KubeError, resource_path
from kvstack.common.waits import wait_until
from kvstack.operator.runtime import Runtime
from kvstack_testing import Cluster, operator_runner, operator_settings

from .conftest import Api

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SPEC: dict[str, Any] = {
    "models": [{"name": "llama", "model": "sim-llama", "gpus": 1, "minReplicas": 1, "maxReplicas": 3}],
    "autoscaling": {"enabled": False},
}


@contextlib.contextmanager
def operator(cluster: Cluster, namespace: str, **overrides: Any) -> Iterator[Runtime]:
    settings = operator_settings(cluster, namespace, **{"resync_seconds": 2.0, **overrides})
    runtime = Runtime(settings)
    with operator_runner(runtime, namespace) as runner:
        yield runtime
    assert runner.exception is None, runner.output
    assert "Traceback" not in runner.output, runner.output


@pytest.mark.usefixtures("kubeconfig_env")
def test_create_edit_drift_delete(cluster: Cluster, namespace: str, api: Api) -> None:
    with operator(cluster, namespace):
        api.create("demo", SPEC)
        want = {"demo-llama", "demo-router", "demo-redis"}
        wait_until(lambda: api.names("Deployment") >= want, "the stack's Deployments")
        wait_until(lambda: api.names("Service") >= want, "the stack's Services")
        wait_until(lambda: api.names("ConfigMap") >= {"demo-llama", "demo-router"}, "the stack's ConfigMaps")
        stack = api.get("demo")
        engine = api.deployment("demo-llama")
        assert engine is not None
        (ref,) = engine["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"]) == ("KVStack", "demo", stack["metadata"]["uid"])
        assert engine["spec"]["replicas"] == 1
        assert engine["spec"]["template"]["metadata"]["labels"]["kvstack.dev/model"] == "llama"
        wait_until(lambda: (api.condition("demo", "Reconciled") or {}).get("status") == "True", "Reconciled")
        wait_until(
            lambda: (api.condition("demo", "Ready") or {}).get("status") == "True", "Ready (kwok pods)"
        )
        status = api.get("demo")["status"]
        assert status["observedGeneration"] == stack["metadata"]["generation"]
        assert status["engines"] == "1/1"
        assert status["router"]["readyReplicas"] == 1

        # Edit: a second model appears, the first one's fixed replicas follow the spec.
        spec = {
            **SPEC,
            "models": [
                {**SPEC["models"][0], "replicas": 2},
                {"name": "qwen", "model": "sim-qwen", "gpus": 1},
            ],
        }
        api.patch_spec("demo", spec)
        wait_until(lambda: "demo-qwen" in api.names("Deployment"), "the new model's Deployment")
        wait_until(lambda: api.replicas("demo-llama") == 2, "replicas following the spec")

        # Drift: a hand edit of an owned object is undone by the next resync.
        api.kube.merge_patch(
            resource_path("apps/v1", "deployments", namespace, "demo-router"), {"spec": {"replicas": 3}}
        )
        wait_until(lambda: api.replicas("demo-router") == 1, "the router's replicas restored")

        # Removing a model prunes its objects.
        api.patch_spec("demo", {"models": [spec["models"][0]]})
        wait_until(
            lambda: "demo-qwen" not in api.names("Deployment"), "the dropped model's Deployment pruned"
        )
        wait_until(lambda: "demo-qwen" not in api.names("ConfigMap"), "the dropped model's ConfigMap pruned")

        # The scale subresource sizes the router.
        cluster.kubectl("scale", "-n", namespace, "kvstack/demo", "--replicas=2")
        wait_until(lambda: api.replicas("demo-router") == 2, "kubectl scale on the router")

        # Delete (while the operator runs: kopf's timer holds a finalizer it removes on deletion);
        # the garbage collector (kube-controller-manager) then follows the ownerReferences.
        api.delete("demo")
        wait_until(lambda: "demo" not in {s["metadata"]["name"] for s in api.list()}, "the stack gone")
    wait_until(lambda: not api.names("Deployment"), "owned Deployments collected", timeout=90)
    wait_until(lambda: not api.names("ConfigMap"), "owned ConfigMaps collected", timeout=90)


@pytest.mark.usefixtures("kubeconfig_env")
def test_a_spec_the_engine_refuses_is_reported_in_status(cluster: Cluster, namespace: str, api: Api) -> None:
    bad = {"models": [{"name": "llama", "model": "m", "args": ["--max-model-len", "10"]}]}
    with operator(cluster, namespace):
        api.create("bad", bad)
        cond = wait_until(lambda: api.condition("bad", "Reconciled"), "a Reconciled condition")
        assert cond["status"] == "False" and cond["reason"] == "InvalidSpec"
        assert "extra_args" in cond["message"]
        assert "bad-llama" not in api.names("Deployment")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"models": [{"name": "m", "model": "x", "minReplicas": 3, "maxReplicas": 2}]},
            "minReplicas must not exceed maxReplicas",
        ),
        ({"models": [{"name": "m", "model": "x"}], "autoscaling": {"metric": "cpu"}}, "Unsupported value"),
        ({"models": []}, "should have at least 1 items"),
        ({"models": [{"name": "Bad_Name", "model": "x"}]}, "spec.models[0].name"),
        (
            {"models": [{"name": "m", "model": "x"}], "cache": {"mode": "external"}},
            "cache.mode external needs url or urlSecretRef",
        ),
        (
            {"models": [{"name": "m", "model": "x", "blockSize": 16, "lmcache": {"chunkSize": 20}}]},
            "lmcache.chunkSize must be a multiple of blockSize",
        ),
        (
            {
                "models": [{"name": "m", "model": "x"}],
                "router": {"flowControl": {"saturation": {"lowerClassShare": 1.5}}},
            },
            "spec.router.flowControl.saturation.lowerClassShare",
        ),
        (
            {
                "models": [{"name": "m", "model": "x"}],
                "router": {"flowControl": {"saturation": {"headroomWindowSeconds": -1}}},
            },
            "spec.router.flowControl.saturation.headroomWindowSeconds",
        ),
    ],
)
def test_the_api_server_rejects_invalid_resources_readably(
    api: Api, spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(KubeError) as err:
        api.create("bad", spec)
    assert err.value.status == 422
    assert message in str(err.value), err.value


def test_defaults_are_applied_by_the_api_server(api: Api) -> None:
    created = api.create("defaults", {"models": [{"name": "m", "model": "x"}]})
    spec = created["spec"]
    assert spec["autoscaling"]["scaleDown"]["stabilizationSeconds"] == 300
    assert spec["autoscaling"]["metric"] == "waitingPerReplica"
    assert spec["models"][0]["lmcache"]["chunkSize"] == 256
    assert spec["router"]["policy"] == "cache_aware"
    saturation = spec["router"]["flowControl"]["saturation"]
    assert (saturation["lowerClassShare"], saturation["headroomWindowSeconds"]) == (0.5, 10)
    with pytest.raises(Exception, match="at most 22"):
        api.create("a-name-that-is-far-too-long-for-us", {"models": [{"name": "m", "model": "x"}]})
