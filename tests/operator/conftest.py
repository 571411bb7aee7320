"""Fixtures for the operator's cluster tests: the CRD installed, and the operator under KopfRunner.

The cluster fixtures come from :mod:`kvstack.testing.pytest_plugin`, registered in tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kvstack.observability.prometheus import KubeAccess
from kvstack.operator.crd import CRD_FILE, GROUP, PLURAL, VERSION
from kvstack.operator.runtime import Runtime
from kvstack.testing import Cluster
from kvstack.testing.kube_access import prometheus_access


@pytest.fixture(scope="session")
def crd_installed(cluster: Cluster) -> str:
    """The KVStack CRD applied and Established; returns its name."""
    applied = cluster.kubectl("apply", "--server-side", "-f", str(CRD_FILE), check=False)
    assert applied.returncode == 0, applied.stderr
    name = f"{PLURAL}.{GROUP}"
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    return name


class Api:
    """The calls the tests make, through the cluster's kubernetes client."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        from kubernetes import client

        self.cluster = cluster
        self.namespace = namespace
        api = cluster.api_client()
        self.custom: Any = client.CustomObjectsApi(api)
        self.apps: Any = client.AppsV1Api(api)
        self.core: Any = client.CoreV1Api(api)

    def create(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "KVStack",
            "metadata": {"name": name},
            "spec": spec,
        }
        result: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, body
        )
        return result

    def get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        return result

    def list(self) -> list[dict[str, Any]]:
        result = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        return list(result["items"])

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec}
        )

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def deployment(self, name: str) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.apps.read_namespaced_deployment(name, self.namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def names(self, kind: str) -> set[str]:
        lister = {
            "Deployment": self.apps.list_namespaced_deployment,
            "Service": self.core.list_namespaced_service,
            "ConfigMap": self.core.list_namespaced_config_map,
        }[kind]
        items = lister(self.namespace, label_selector="app.kubernetes.io/managed-by=kvstack-operator").items
        return {i.metadata.name for i in items}

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
    """kopf's login reads $KUBECONFIG; point it at the test cluster only."""
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
