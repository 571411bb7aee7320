"""The shared Kubernetes layer against the real control plane: every way to authenticate, the
token refresh, server-side apply and the scale subresource, and watch resumption.

Who the API server took a request for is asked of the server itself (a SelfSubjectReview), so each
test shows which credentials were really sent, not what the loader meant to send.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from tests.router_discovery.test_monitor_live import until

from kvstack.common.kube import (
    Credentials,
    KubeClient,
    KubeError,
    Listed,
    WatchEvent,
    WatchExpired,
    load_credentials,
    reflect,
    resource_path,
    watch,
)
from kvstack.operator.kube import kopf_login
from kvstack_testing import Cluster
from kvstack_testing.kube_access import cluster_ca, service_account_token, write_service_account_files

pytestmark = [pytest.mark.cluster]

READERS = ("reader-a", "reader-b")


@pytest.fixture
def readers(cluster: Cluster, namespace: str) -> str:
    """ServiceAccounts ``reader-a`` and ``reader-b``, allowed to read pods in ``namespace`` only."""
    kube = cluster.kube()
    for name in READERS:
        kube.create(resource_path("v1", "serviceaccounts", namespace), {"metadata": {"name": name}})
    rbac = "rbac.authorization.k8s.io/v1"
    rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    kube.create(resource_path(rbac, "roles", namespace), {"metadata": {"name": "pods"}, "rules": rules})
    binding = {
        "metadata": {"name": "pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pods"},
        "subjects": [{"kind": "ServiceAccount", "name": n, "namespace": namespace} for n in READERS],
    }
    kube.create(resource_path(rbac, "rolebindings", namespace), binding)
    return namespace


def account(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


async def whoami(kube: KubeClient) -> str:
    """The user name the API server authenticated this client's request as."""
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    answer = await kube.create("/apis/authentication.k8s.io/v1/selfsubjectreviews", review)
    return str(answer["status"]["userInfo"]["username"])


def token_kubeconfig(cluster: Cluster, path: Path, users: Mapping[str, dict[str, Any]], current: str) -> Path:
    """A kubeconfig with the cluster's CA inline and one context per user (named as the user)."""
    server = {
        "server": cluster.server,
        "certificate-authority-data": base64.b64encode(cluster_ca(cluster)).decode(),
    }
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": server}],
        "users": [{"name": n, "user": u} for n, u in users.items()],
        "contexts": [{"name": n, "context": {"cluster": "test", "user": n}} for n in users],
        "current-context": current,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


async def test_admin_kubeconfig_authenticates_with_its_client_certificate(cluster: Cluster) -> None:
    creds = load_credentials(cluster.kubeconfig, cluster.context)
    assert creds.client_cert is not None and creds.client_key is not None
    async with KubeClient(creds) as kube:
        assert await whoami(kube) != "system:anonymous"
        assert await kube.get(resource_path("v1", "namespaces", name="kube-system")) is not None


async def test_named_context_and_bearer_token(cluster: Cluster, readers: str, tmp_path: Path) -> None:
    token = service_account_token(cluster, readers, "reader-b")
    users = {"good": {"token": token}, "bad": {"token": "not-a-token"}}
    path = token_kubeconfig(cluster, tmp_path / "kc", users, current="bad")
    async with KubeClient(load_credentials(path)) as kube:  # the current context: refused
        with pytest.raises(KubeError) as err:
            await kube.list(resource_path("v1", "pods", readers))
        assert err.value.status == 401
    async with KubeClient(load_credentials(path, "good")) as kube:
        assert await whoami(kube) == account(readers, "reader-b")
        await kube.list(resource_path("v1", "pods", readers))
        with pytest.raises(KubeError) as err:  # RBAC is enforced: the token is really the account's
            await kube.list(resource_path("v1", "pods", "kube-system"))
        assert err.value.status == 403


async def test_in_cluster_files_and_a_rotated_token(cluster: Cluster, readers: str, tmp_path: Path) -> None:
    sa_dir = write_service_account_files(cluster, tmp_path / "sa", readers, "reader-a")
    url = urlsplit(cluster.server)
    env = {"KUBERNETES_SERVICE_HOST": str(url.hostname), "KUBERNETES_SERVICE_PORT": str(url.port)}
    creds = load_credentials(service_account_dir=sa_dir, environ=env)
    assert creds.namespace == readers  # from the namespace file
    async with KubeClient(creds) as kube:
        assert await whoami(kube) == account(readers, "reader-a")
        # the kubelet rotates the token: a new file swapped in; the same client sends it next
        fresh = tmp_path / "token.new"
        fresh.write_text(service_account_token(cluster, readers, "reader-b"))
        fresh.replace(sa_dir / "token")
        assert await whoami(kube) == account(readers, "reader-b")


PLUGIN = """#!/bin/sh
# One token per run: tok.1, tok.2, ... then tok.last; EXPIRES (if set) is the token's expiry.
n=$(( $(cat runs 2>/dev/null || echo 0) + 1 )); echo $n > runs
tok=$(cat tok.$n 2>/dev/null || cat tok.last)
exp=""; [ -n "$EXPIRES" ] && exp=",\\"expirationTimestamp\\":\\"$EXPIRES\\""
kind='"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential"'
printf '{%s,"status":{"token":"%s"%s}}' "$kind" "$tok" "$exp"
"""


def plugin_kubeconfig(
    cluster: Cluster, directory: Path, tokens: list[str], expires: str | None = None
) -> Path:
    directory.mkdir()
    plugin = directory / "plugin.sh"
    plugin.write_text(PLUGIN)
    plugin.chmod(0o755)
    for i, token in enumerate(tokens, 1):
        (directory / f"tok.{i}").write_text(token)
    (directory / "tok.last").write_text(tokens[-1])
    spec: dict[str, Any] = {"apiVersion": "client.authentication.k8s.io/v1", "command": "./plugin.sh"}
    if expires:
        spec["env"] = [{"name": "EXPIRES", "value": expires}]
    return token_kubeconfig(cluster, directory / "kc", {"plugin": {"exec": spec}}, current="plugin")


def runs(directory: Path) -> int:
    return int((directory / "runs").read_text())


async def test_exec_plugin_token_is_refreshed_on_401_and_kept_until_expiry(
    cluster: Cluster, readers: str, tmp_path: Path
) -> None:
    good = service_account_token(cluster, readers, "reader-a")
    # the plugin's first token is refused: the request is sent again with the plugin's next one
    cached = plugin_kubeconfig(cluster, tmp_path / "cached", ["stale-token", good])
    async with KubeClient(load_credentials(cached)) as kube:
        assert await whoami(kube) == account(readers, "reader-a")
        assert runs(tmp_path / "cached") == 2
        await kube.list(resource_path("v1", "pods", readers))
        assert runs(tmp_path / "cached") == 2  # no expiry given: the token is kept
    # an expiring token (already past here) is fetched again for every request
    expiring = plugin_kubeconfig(cluster, tmp_path / "expiring", [good], expires="2000-01-01T00:00:00Z")
    async with KubeClient(load_credentials(expiring)) as kube:
        await whoami(kube)
        await whoami(kube)
        assert runs(tmp_path / "expiring") == 2


async def test_kopf_logs_in_with_the_same_credentials(cluster: Cluster, readers: str, tmp_path: Path) -> None:
    admin = await kopf_login(cluster.kubeconfig, cluster.context)
    creds = load_credentials(cluster.kubeconfig, cluster.context)
    assert admin.server == creds.server
    assert creds.client_cert is not None and creds.client_key is not None
    assert (admin.certificate_path, admin.certificate_data) == (
        str(creds.client_cert.path) if creds.client_cert.path else None,
        creds.client_cert.data,
    )
    assert (admin.private_key_path, admin.private_key_data) == (
        str(creds.client_key.path) if creds.client_key.path else None,
        creds.client_key.data,
    )
    token = service_account_token(cluster, readers, "reader-a")
    path = token_kubeconfig(cluster, tmp_path / "kc", {"u": {"token": token}}, current="u")
    login = await kopf_login(path)
    assert (login.token, login.ca_data, login.default_namespace) == (token, cluster_ca(cluster), "default")


async def test_server_side_apply_and_the_scale_subresource(cluster: Cluster, namespace: str) -> None:
    labels = {"app": "ssa"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "ssa", "namespace": namespace},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "c", "image": "x"}]},
            },
        },
    }
    path = resource_path("apps/v1", "deployments", namespace, "ssa")
    async with KubeClient(cluster.credentials()) as kube:
        applied = await kube.apply(path, deployment, manager="kvstack-test")
        assert applied["spec"]["replicas"] == 0
        scaled = await kube.scale(path, 3, manager="kvstack-test-scaler")
        assert (scaled["kind"], scaled["spec"]["replicas"]) == ("Scale", 3)
        dep = await kube.get(path)
        assert dep is not None and dep["spec"]["replicas"] == 3
        managers = {f["manager"] for f in dep["metadata"]["managedFields"]}
        assert {"kvstack-test", "kvstack-test-scaler"} <= managers
        with pytest.raises(KubeError) as err:  # replicas now belong to the scaler: apply conflicts
            await kube.apply(
                path,
                {**deployment, "spec": {**deployment["spec"], "replicas": 1}},
                manager="other",
                force=False,
            )
        assert err.value.status == 409
        await kube.delete(path)
        assert await kube.get(path) is None
        await kube.delete(path)  # gone already: not an error


class CountingClient(KubeClient):
    """The real client, remembering the parameters of every watch it opens."""

    def __init__(self, credentials: Credentials) -> None:
        super().__init__(credentials)
        self.watches: list[Mapping[str, str | int]] = []

    @contextlib.asynccontextmanager
    async def stream(self, path: str, params: Mapping[str, str | int]) -> AsyncIterator[AsyncIterator[str]]:
        self.watches.append(dict(params))
        async with super().stream(path, params) as lines:
            yield lines


def pod(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"w": "1"}},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    }


@contextlib.contextmanager
def following(kube: KubeClient, path: str, seen: list[Listed | WatchEvent]) -> Iterator[None]:
    async def run() -> None:
        async for item in reflect(kube, path, label_selector="w=1", timeout_s=2):
            seen.append(item)

    task = asyncio.get_running_loop().create_task(run())
    try:
        yield
    finally:
        task.cancel()


async def test_reflect_resumes_each_ended_watch_from_the_last_version(
    cluster: Cluster, namespace: str
) -> None:
    path = resource_path("v1", "pods", namespace)
    seen: list[Listed | WatchEvent] = []
    async with CountingClient(cluster.credentials()) as kube:
        with following(kube, path, seen):
            await until(lambda: len(kube.watches) == 1, "the first watch")
            await kube.create(path, pod("p1"))
            await until(
                lambda: any(isinstance(i, WatchEvent) and i.object["metadata"]["name"] == "p1" for i in seen),
                "p1",
            )
            await until(lambda: len(kube.watches) >= 3, "two watches ended by the server and resumed", 60)
            await kube.create(path, pod("p2"))
            await until(
                lambda: any(isinstance(i, WatchEvent) and i.object["metadata"]["name"] == "p2" for i in seen),
                "p2",
            )
    assert sum(isinstance(i, Listed) for i in seen) == 1  # resumed, never re-listed
    listed = seen[0]
    assert isinstance(listed, Listed)
    assert kube.watches[0]["resourceVersion"] == listed.resource_version
    # each resumed where the events seen before it left off (p1's events came before the third watch)
    versions = {i.resource_version for i in seen if isinstance(i, WatchEvent)}
    assert {w["resourceVersion"] for w in kube.watches[1:]} <= versions | {listed.resource_version}
    assert kube.watches[2]["resourceVersion"] in versions
    assert all(w["allowWatchBookmarks"] == "true" for w in kube.watches)


async def test_a_compacted_version_raises_watch_expired(cluster: Cluster, namespace: str) -> None:
    async with KubeClient(cluster.credentials()) as kube:
        with pytest.raises(WatchExpired):
            async for _ in watch(kube, resource_path("v1", "pods", namespace), "1", timeout_s=5):
                pass
