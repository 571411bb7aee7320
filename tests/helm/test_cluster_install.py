"""`helm install / upgrade / uninstall` against a real kube-apiserver (kwok plays the kubelet)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.helm.conftest import CHART
from tests.helm.test_chart_files import SAMPLE_CRD

from kvstack.common.waits import wait_until
from kvstack_testing import Cluster

pytestmark = pytest.mark.cluster
INSTANCE = "app.kubernetes.io/instance"
# Every namespaced kind the chart can create.
RELEASE_KINDS = [
    *("deployments", "statefulsets", "services", "configmaps", "secrets", "serviceaccounts", "roles"),
    *("rolebindings", "poddisruptionbudgets", "persistentvolumeclaims", "networkpolicies", "ingresses"),
]


def helm(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [
            str(cluster.tools.helm),
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--kube-context",
            cluster.context,
            *args,
        ],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def release(
    cluster: Cluster, action: str, namespace: str, *values: str, chart: Path = CHART
) -> subprocess.CompletedProcess[str]:
    """``helm install|upgrade rel CHART -n NAMESPACE VALUES... --wait``: the release every test uses."""
    return helm(cluster, action, "rel", str(chart), "-n", namespace, *values, "--wait", "--timeout", "180s")


def get(cluster: Cluster, namespace: str, kinds: str, selector: str = "") -> list[dict[str, Any]]:
    args = ["get", kinds, "-n", namespace, "-o", "yaml", *(["-l", selector] if selector else [])]
    return list(yaml.safe_load(cluster.kubectl(*args).stdout)["items"])


def running_pods(cluster: Cluster, namespace: str, component: str, count: int) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]]:
        pods = get(cluster, namespace, "pods", f"app.kubernetes.io/component={component}")
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        ok = len(live) == count and all(p["status"].get("phase") == "Running" for p in live)
        return live if ok else []

    return list(wait_until(check, f"{count} running {component} pods in {namespace}", timeout=120))


def secret_value(cluster: Cluster, namespace: str, name: str, key: str) -> str:
    (secret,) = [s for s in get(cluster, namespace, "secrets") if s["metadata"]["name"] == name]
    return base64.b64decode(secret["data"][key]).decode()


def test_install_is_accepted_and_every_pod_runs(cluster: Cluster, namespace: str) -> None:
    release(cluster, "install", namespace, "--set", "auth.enabled=true")
    # Every object of the release exists as rendered.
    manifest = [
        d for d in yaml.safe_load_all(helm(cluster, "get", "manifest", "rel", "-n", namespace).stdout) if d
    ]
    for obj in manifest:
        found = cluster.kubectl("get", obj["kind"], obj["metadata"]["name"], "-n", namespace, check=False)
        assert found.returncode == 0, f"{obj['kind']}/{obj['metadata']['name']} missing: {found.stderr}"
    running_pods(cluster, namespace, "router", 2)
    (engine,) = running_pods(cluster, namespace, "engine", 1)
    running_pods(cluster, namespace, "redis", 1)
    # The scheduler placed the engine by its GPU request on a fake GPU node.
    assert engine["spec"]["nodeName"].startswith("gpu-node-")
    assert engine["metadata"]["labels"]["kvstack.dev/model"] == "llama-8b"
    # The router's Role lets its ServiceAccount watch pods, and nothing cluster-wide.
    sa = f"system:serviceaccount:{namespace}:rel-kvstack-router"
    can = cluster.kubectl("auth", "can-i", "watch", "pods", "-n", namespace, "--as", sa, check=False)
    assert can.stdout.strip() == "yes"
    cannot = cluster.kubectl("auth", "can-i", "list", "pods", "-A", "--as", sa, check=False)
    assert cannot.stdout.strip() == "no"
    cannot = cluster.kubectl("auth", "can-i", "get", "secrets", "-n", namespace, "--as", sa, check=False)
    assert cannot.stdout.strip() == "no"


def test_upgrade_applies_changed_values_and_keeps_generated_secrets(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    release(cluster, "install", namespace, "--set", "auth.enabled=true")
    password = secret_value(cluster, namespace, "rel-kvstack-secrets", "redis-password")
    api_key = secret_value(cluster, namespace, "rel-kvstack-secrets", "api-key")
    (redis_before,) = get(cluster, namespace, "statefulsets")

    changed = {
        "auth": {"enabled": True},
        "router": {"replicas": 3},
        "redis": {"maxmemory": "5gb"},
        "engines": {
            "models": [
                {"name": "llama-8b", "model": "meta-llama/Llama-3.1-8B-Instruct"},
                {"name": "qwen-32b", "model": "Qwen/Qwen2.5-32B-Instruct", "gpus": 2, "replicas": 2},
            ]
        },
    }
    values = tmp_path / "upgrade.yaml"
    values.write_text(yaml.safe_dump(changed))
    release(cluster, "upgrade", namespace, "-f", str(values))

    running_pods(cluster, namespace, "router", 3)
    engines = running_pods(cluster, namespace, "engine", 3)
    qwen = [p for p in engines if p["metadata"]["labels"]["kvstack.dev/model"] == "qwen-32b"]
    assert len(qwen) == 2
    assert all(p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2" for p in qwen)
    # Generated credentials survive the upgrade (read back from the live Secret).
    assert secret_value(cluster, namespace, "rel-kvstack-secrets", "redis-password") == password
    assert secret_value(cluster, namespace, "rel-kvstack-secrets", "api-key") == api_key
    # A config change rolls Redis (checksum annotation).
    (redis_after,) = get(cluster, namespace, "statefulsets")
    before = redis_before["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert redis_after["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != before
    (conf,) = [
        c for c in get(cluster, namespace, "configmaps") if c["metadata"]["name"] == "rel-kvstack-redis"
    ]
    assert "maxmemory 5gb" in conf["data"]["redis.conf"]


def test_uninstall_leaves_nothing_but_kept_crds(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    chart = tmp_path / "kvstack"
    shutil.copytree(CHART, chart)
    # Only a CRD of this test's own: the real KVStack CRD belongs to the operator's tests.
    for crd_file in (chart / "files" / "crds").glob("*.yaml"):
        crd_file.unlink()
    crd: dict[str, Any] = {**SAMPLE_CRD, "metadata": {"name": f"stacks{namespace[5:]}.kvstack.dev"}}
    crd["spec"] = {
        **SAMPLE_CRD["spec"],
        "names": {"kind": "Stack", "plural": f"stacks{namespace[5:]}", "singular": "stack"},
    }
    (chart / "files" / "crds" / "stacks.yaml").write_text(yaml.safe_dump(crd))
    try:
        release(cluster, "install", namespace, "--set", "operator.enabled=true", chart=chart)
        running_pods(cluster, namespace, "operator", 1)
        helm(cluster, "uninstall", "rel", "-n", namespace, "--wait", "--timeout", "120s")

        kinds = ",".join(RELEASE_KINDS)
        left = [
            f"{o['kind']}/{o['metadata']['name']}" for o in get(cluster, namespace, kinds, f"{INSTANCE}=rel")
        ]
        assert left == []
        wait_until(lambda: not get(cluster, namespace, "pods", f"{INSTANCE}=rel"), "pods to go", timeout=120)
        kept = cluster.kubectl("get", "crd", crd["metadata"]["name"], "-o", "yaml", check=False)
        assert kept.returncode == 0, "the CRD was deleted with the release"
        assert yaml.safe_load(kept.stdout)["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    finally:
        cluster.kubectl("delete", "crd", crd["metadata"]["name"], "--ignore-not-found", check=False)
