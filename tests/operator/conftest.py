"""Fixtures for the operator's cluster tests: the CRD installed, and the operator under KopfRunner.

The cluster fixtures come from :mod:`kvstack_testing.pytest_plugin`, registered in tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kvstack.common.kube import resource_path
from kvstack.observability.prometheus import KubeAccess
from kvstack.operator.crd import CRD_FILE, GROUP, PLURAL, VERSION
from kvstack.operator.runtime import Runtime
from kvstack_testing import Cluster
from kvstack_testing.kube_access import prometheus_access


@pytest.fixture(scope="session")
def crd_installed(cluster: Cluster) -> str:
    """The KVStack CRD applied and Established; returns its name."""
    applied = cluster.kubectl("apply", "--server-side", "-f", str(CRD_FILE), check=False)
    assert applied.returncode == 0, applied.stderr
    name = f"{PLURAL}.{GROUP}"
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    return name


class Api:
    """The calls the tests make, through the shared client (:mod:`kvstack.common.kube`)."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.kube = cluster.kube()

    def _stacks(self, name: str | None = None) -> str:
        return resource_path(f"{GROUP}/{VERSION}", PLURAL, self.namespace, name)

    def create(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "KVStack",
            "metadata": {"name": name},
            "spec": spec,
        }
        return self.kube.create(self._stacks(), body)

    def get(self, name: str) -> dict[str, Any]:
        found = self.kube.get(self._stacks(name))
        assert found is not None, f"no KVStack {name}"
        return found

    def list(self) -> list[dict[str, Any]]:
        return self.kube.list(self._stacks()).items

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.kube.merge_patch(self._stacks(name), {"spec": spec})

    def delete(self, name: str) -> None:
        self.kube.delete(self._stacks(name))

    def deployment(self, name: str) -> dict[str, Any] | None:
        return self.kube.get(resource_path("apps/v1", "deployments", self.namespace, name))

    def replicas(self, name: str) -> int:
        """``spec.replicas`` of Deployment ``name`` (which must exist)."""
        dep = self.deployment(name)
        assert dep is not None, f"no Deployment {name}"
        return int(dep["spec"]["replicas"])

    def events(self, involved: str) -> list[dict[str, Any]]:
        """The Events about the object called ``involved``."""
        path = resource_path("v1", "events", self.namespace)
        found = self.kube.request("GET", path, params={"fieldSelector": f"involvedObject.name={involved}"})
        return list((found or {}).get("items") or [])

    def names(self, kind: str) -> set[str]:
        api_version, plural = {
            "Deployment": ("apps/v1", "deployments"),
            "Service": ("v1", "services"),
            "ConfigMap": ("v1", "configmaps"),
        }[kind]
        path = resource_path(api_version, plural, self.namespace)
        items = self.kube.list(path, label_selector="app.kubernetes.io/managed-by=kvstack-operator").items
        return {i["metadata"]["name"] for i in items}

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        for cond in self.get(name).get("status", {}).get("conditions", []):
            if cond["type"] == type_:
                return dict(cond)
        return None


@pytest.fixture
def api(cluster: Cluster, namespace: str, crd_installed: str) -> Api:
    return Api(cluster, namespace)


@pytest.fixture
def kubeconfig_env(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The operator (kopf's login and its client alike) reads $KUBECONFIG: the test cluster only."""
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    yield


@pytest.fixture(scope="session")
def prom_access(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> KubeAccess:
    """A pod-reader ServiceAccount's token and the cluster CA in files, for Prometheus' pod discovery."""
    return prometheus_access(cluster, tmp_path_factory.mktemp("prometheus-credentials"))


def evaluations(runtime: Runtime) -> float:
    """How many evaluations the operator has finished (all models, all outcomes)."""
    return sum(
        s.value for m in runtime.metrics.decisions.collect() for s in m.samples if s.name.endswith("_total")
    )
