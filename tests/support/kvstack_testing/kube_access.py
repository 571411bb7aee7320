"""Credentials for a Prometheus outside the test cluster that discovers its pods, as files.

A Prometheus in a real cluster reads its ServiceAccount's token and the cluster CA from files, and
RBAC allows it what its discovery needs (for pod discovery: get, list and watch pods). The harness
gives a local Prometheus the same: a ServiceAccount bound to such a ClusterRole, a token from the
TokenRequest API, and the API server's CA, written beside each other, so RBAC is enforced on it.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kvstack.common.kube import resource_path
from kvstack.observability.prometheus import KubeAccess
from kvstack_testing.cluster import Cluster

SA_NAMESPACE = "kube-system"
SA_NAME = "kvstack-prometheus"
POD_READER_RULES = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]


def kubeconfig_ca(doc: Mapping[str, Any], context: str, base: Path) -> bytes:
    """The PEM of the CA that ``context``'s cluster is verified with; ValueError if none is set."""
    ctx = next((c["context"] for c in doc.get("contexts") or [] if c.get("name") == context), None)
    if ctx is None:
        raise ValueError(f"no context {context!r} in the kubeconfig")
    cluster = next((c["cluster"] for c in doc.get("clusters") or [] if c.get("name") == ctx["cluster"]), None)
    if cluster is None:
        raise ValueError(f"no cluster {ctx['cluster']!r} in the kubeconfig")
    if cluster.get("certificate-authority-data"):
        return base64.b64decode(cluster["certificate-authority-data"])
    if cluster.get("certificate-authority"):
        path = Path(cluster["certificate-authority"])
        return (path if path.is_absolute() else base / path).read_bytes()
    raise ValueError(f"cluster {ctx['cluster']!r} names no certificate authority")


def pod_reader_objects(namespace: str = SA_NAMESPACE, name: str = SA_NAME) -> list[dict[str, Any]]:
    """ServiceAccount, ClusterRole (get/list/watch pods) and the ClusterRoleBinding between them."""
    rbac = "rbac.authorization.k8s.io/v1"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}},
        {"apiVersion": rbac, "kind": "ClusterRole", "metadata": {"name": name}, "rules": POD_READER_RULES},
        {
            "apiVersion": rbac,
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        },
    ]


def service_account_token(cluster: Cluster, namespace: str, name: str, expiration_s: int = 3600) -> str:
    """A token for ServiceAccount ``namespace/name`` from the TokenRequest API."""
    path = resource_path("v1", "serviceaccounts", namespace, name, "token")
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest"}
    answer = cluster.kube().create(path, {**body, "spec": {"expirationSeconds": expiration_s}})
    return str(answer["status"]["token"])


def cluster_ca(cluster: Cluster) -> bytes:
    """The PEM the cluster's API server certificate is verified with."""
    doc = yaml.safe_load(cluster.kubeconfig.read_text())
    return kubeconfig_ca(doc, cluster.context, cluster.kubeconfig.parent)


def write_service_account_files(
    cluster: Cluster, directory: Path, namespace: str, name: str, expiration_s: int = 3600
) -> Path:
    """``token``, ``ca.crt`` and ``namespace`` of a ServiceAccount, laid out as in a pod's
    ``/var/run/secrets/kubernetes.io/serviceaccount``; returns ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    token_file = directory / "token"
    token_file.write_text(service_account_token(cluster, namespace, name, expiration_s))
    token_file.chmod(0o600)
    (directory / "ca.crt").write_bytes(cluster_ca(cluster))
    (directory / "namespace").write_text(namespace)
    return directory


def prometheus_access(cluster: Cluster, directory: Path, expiration_s: int = 86_400) -> KubeAccess:
    """A pod-reader ServiceAccount's token and the cluster CA, written under ``directory``.

    The token outlives a whole test session (Prometheus re-reads the file, but nothing renews it).
    """
    applied = cluster.kubectl(
        "apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(pod_reader_objects()), check=False
    )
    if applied.returncode != 0:
        raise RuntimeError(f"cannot create Prometheus' ServiceAccount: {applied.stderr}")
    write_service_account_files(cluster, directory, SA_NAMESPACE, SA_NAME, expiration_s)
    return KubeAccess(
        api_server=cluster.server, ca_file=directory / "ca.crt", bearer_token_file=directory / "token"
    )
