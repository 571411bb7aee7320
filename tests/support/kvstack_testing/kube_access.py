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


def prometheus_access(cluster: Cluster, directory: Path, expiration_s: int = 86_400) -> KubeAccess:
    """A pod-reader ServiceAccount's token and the cluster CA, written under ``directory``.

    The token outlives a whole test session (Prometheus re-reads the file, but nothing renews it).
    """
    from kubernetes import client

    api = cluster.api_client()
    applied = cluster.kubectl(
        "apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(pod_reader_objects()), check=False
    )
    if applied.returncode != 0:
        raise RuntimeError(f"cannot create Prometheus' ServiceAccount: {applied.stderr}")
    core: Any = client.CoreV1Api(api)
    request = {"spec": {"expirationSeconds": expiration_s}}
    token = core.create_namespaced_service_account_token(SA_NAME, SA_NAMESPACE, request).status.token
    directory.mkdir(parents=True, exist_ok=True)
    token_file, ca_file = directory / "token", directory / "ca.crt"
    token_file.write_text(token)
    token_file.chmod(0o600)
    doc = yaml.safe_load(cluster.kubeconfig.read_text())
    ca_file.write_bytes(kubeconfig_ca(doc, cluster.context, cluster.kubeconfig.parent))
    return KubeAccess(api_server=cluster.server, ca_file=ca_file, bearer_token_file=token_file)
