"""A small async Kubernetes REST client for the objects a stack owns (server-side apply, scale).

kopf watches the ``KVStack`` resources itself; this client writes what they own. Credentials come
from the ``kubernetes`` package's loaders (in-cluster service account, else ``$KUBECONFIG``), so
they match what kopf logs in with.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

FIELD_MANAGER = "kvstack-operator"
SCALE_MANAGER = "kvstack-autoscaler"
PLURALS: dict[str, str] = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "Deployment": "deployments",
    "Role": "roles",
    "RoleBinding": "rolebindings",
}
# Everything the operator may own, for pruning (apiVersion, kind).
OWNED_KINDS: tuple[tuple[str, str], ...] = (
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
)
Obj = dict[str, Any]


class KubeError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{base}/namespaces/{namespace}/{PLURALS[kind]}"


def bearer(cfg: Any) -> str | None:
    """The ``Authorization`` header value of a ``kubernetes.client.Configuration``, or None.

    The loaders store tokens (in-cluster service accounts, kubeconfig tokens) under ``BearerToken``;
    asking for it each time runs their refresh hook, so rotated service-account tokens are picked up.
    """
    value = cfg.get_api_key_with_prefix("BearerToken", alias="authorization")
    return str(value) if value else None


class Kube:
    """Namespaced reads and writes with one pooled HTTP client."""

    def __init__(
        self,
        server: str,
        *,
        verify: ssl.SSLContext | bool = True,
        auth: Callable[[], str | None] | None = None,
    ) -> None:
        self._auth = auth or (lambda: None)
        self._client = httpx.AsyncClient(base_url=server, verify=verify, timeout=30.0)

    @classmethod
    def from_environment(cls, kubeconfig: Path | None = None, context: str | None = None) -> Kube:
        """In-cluster credentials, else the kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``)."""
        from kubernetes import client, config

        cfg = client.Configuration()
        try:
            if kubeconfig is not None:
                raise config.ConfigException("a kubeconfig was given")
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(kubeconfig) if kubeconfig else None, context=context, client_configuration=cfg
            )
        verify: ssl.SSLContext | bool = False
        if cfg.verify_ssl:
            verify = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
            if cfg.cert_file:
                verify.load_cert_chain(cfg.cert_file, cfg.key_file)
        return cls(str(cfg.host), verify=verify, auth=lambda: bearer(cfg))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _request(self, method: str, path: str, **kw: Any) -> Obj | None:
        headers = dict(kw.pop("headers", {}))
        if token := self._auth():
            headers["Authorization"] = token
        for attempt in (1, 2):
            try:
                resp = await self._client.request(method, path, headers=headers, **kw)
                break
            except httpx.TransportError as err:
                # A pooled keep-alive connection the server already closed fails on reuse; every
                # call here is idempotent (GET, apply, merge patch, delete), so one retry is safe (an
                # Event posted twice at worst).
                if attempt == 2:
                    raise KubeError(0, f"{method} {path}: {err!r}") from err
        if resp.status_code == 404 and method in ("GET", "DELETE"):
            return None
        if resp.status_code >= 400:
            try:
                message = resp.json().get("message", resp.text)
            except ValueError:
                message = resp.text
            raise KubeError(resp.status_code, f"{method} {path}: {message}")
        result: Obj = resp.json()
        return result

    async def apply(self, obj: Obj, manager: str = FIELD_MANAGER) -> Obj:
        """Server-side apply (forced: the operator owns these fields)."""
        meta = obj["metadata"]
        path = f"{collection_path(obj['apiVersion'], obj['kind'], meta['namespace'])}/{meta['name']}"
        result = await self._request(
            "PATCH",
            path,
            params={"fieldManager": manager, "force": "true"},
            headers={"Content-Type": "application/apply-patch+yaml"},
            content=json.dumps(obj),
        )
        assert result is not None
        return result

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        return await self._request("GET", f"{collection_path(api_version, kind, namespace)}/{name}")

    async def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[Obj]:
        path = collection_path(api_version, kind, namespace)
        result = await self._request("GET", path, params={"labelSelector": label_selector})
        return list((result or {}).get("items", []))

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        body = {"propagationPolicy": "Background"}
        await self._request("DELETE", f"{collection_path(api_version, kind, namespace)}/{name}", json=body)

    async def scale(self, namespace: str, deployment: str, replicas: int) -> None:
        """Set replicas through the Deployment's ``/scale`` subresource."""
        await self._merge_patch(namespace, f"{deployment}/scale", {"spec": {"replicas": replicas}})

    async def annotate(self, namespace: str, deployment: str, annotations: dict[str, str]) -> None:
        """Merge ``annotations`` into a Deployment's metadata (a merge patch: nothing else changes)."""
        await self._merge_patch(namespace, deployment, {"metadata": {"annotations": annotations}})

    async def _merge_patch(self, namespace: str, deployment_path: str, body: dict[str, Any]) -> None:
        """A JSON merge patch of a Deployment (or its subresource), as the scaler's field manager."""
        await self._request(
            "PATCH",
            f"{collection_path('apps/v1', 'Deployment', namespace)}/{deployment_path}",
            params={"fieldManager": SCALE_MANAGER},
            headers={"Content-Type": "application/merge-patch+json"},
            content=json.dumps(body),
        )

    async def event(self, involved: Obj, type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about ``involved`` (an object as the API returned it)."""
        meta = involved["metadata"]
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion", "apps/v1"),
                "kind": involved.get("kind", "Deployment"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid", ""),
                "resourceVersion": meta.get("resourceVersion", ""),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self._request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", json=body)
