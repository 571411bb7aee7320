"""The operator's writes to the objects a stack owns (server-side apply, scale, prune, Events).

kopf watches the ``KVStack`` resources itself; this writes what they own, through the shared
client (:mod:`kvstack.common.kube`). kopf logs in with :func:`kopf_login`, from the very same
credentials, so both act as one identity and follow the same token rotation.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import kopf

from kvstack.common.kube import Credentials, KubeClient, KubeError, load_credentials, resource_path

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


__all__ = ["FIELD_MANAGER", "OWNED_KINDS", "SCALE_MANAGER", "Kube", "KubeError", "kopf_login"]


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    return resource_path(api_version, PLURALS[kind], namespace)


class Kube:
    """Namespaced reads and writes of owned objects, by apiVersion and kind."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client

    @classmethod
    def from_environment(cls, kubeconfig: Path | None = None, context: str | None = None) -> Kube:
        """In-cluster credentials, else the kubeconfig (see :func:`kvstack.common.kube.load_credentials`)."""
        return cls(KubeClient(load_credentials(kubeconfig, context)))

    async def aclose(self) -> None:
        await self.client.aclose()

    async def apply(self, obj: Obj, manager: str = FIELD_MANAGER) -> Obj:
        """Server-side apply (forced: the operator owns these fields)."""
        meta = obj["metadata"]
        path = f"{collection_path(obj['apiVersion'], obj['kind'], meta['namespace'])}/{meta['name']}"
        return await self.client.apply(path, obj, manager=manager)

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        return await self.client.get(f"{collection_path(api_version, kind, namespace)}/{name}")

    async def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[Obj]:
        listed = await self.client.list(
            collection_path(api_version, kind, namespace), label_selector=label_selector
        )
        return listed.items

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        await self.client.delete(f"{collection_path(api_version, kind, namespace)}/{name}")

    async def scale(self, namespace: str, deployment: str, replicas: int) -> None:
        """Set replicas through the Deployment's ``/scale`` subresource."""
        path = f"{collection_path('apps/v1', 'Deployment', namespace)}/{deployment}"
        await self.client.scale(path, replicas, manager=SCALE_MANAGER)

    async def annotate(self, namespace: str, deployment: str, annotations: dict[str, str]) -> None:
        """Merge ``annotations`` into a Deployment's metadata (a merge patch: nothing else changes)."""
        path = f"{collection_path('apps/v1', 'Deployment', namespace)}/{deployment}"
        await self.client.merge_patch(path, {"metadata": {"annotations": annotations}}, manager=SCALE_MANAGER)

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
        await self.client.create(resource_path("v1", "events", meta["namespace"]), body)


async def kopf_login(kubeconfig: Path | None = None, context: str | None = None) -> kopf.ConnectionInfo:
    """kopf's connection, from the credentials :meth:`Kube.from_environment` loads.

    kopf calls its login handler again when the API answers 401, which re-reads a rotated token
    file or re-runs an exec plugin, as the shared client does on a 401.
    """
    creds: Credentials = await asyncio.to_thread(load_credentials, kubeconfig, context)
    token = await creds.token.token()  # a fresh source each login: the token file or plugin is read anew
    return kopf.ConnectionInfo(
        server=creds.server,
        ca_path=str(creds.ca.path) if creds.ca and creds.ca.path else None,
        ca_data=creds.ca.data if creds.ca else None,
        insecure=creds.insecure,
        username=creds.username,
        password=creds.password,
        token=token,
        certificate_path=str(creds.client_cert.path)
        if creds.client_cert and creds.client_cert.path
        else None,
        certificate_data=creds.client_cert.data if creds.client_cert else None,
        private_key_path=str(creds.client_key.path) if creds.client_key and creds.client_key.path else None,
        private_key_data=creds.client_key.data if creds.client_key else None,
        default_namespace=creds.namespace,
        expiration=None,
    )
