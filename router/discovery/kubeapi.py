"""The few Kubernetes API calls discovery makes, with ``httpx`` on the event loop.

Credentials come from the ``kubernetes`` package's loaders (in-cluster service account, or a
kubeconfig file with its contexts, certificates and exec plugins), run in a thread because they
do file I/O and may spawn a plugin; the requests themselves are plain async HTTP: a paginated
list, then a streamed watch read line by line (one JSON event per line).
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from kubernetes import client as kclient
from kubernetes import config as kconfig

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class WatchExpired(Exception):
    """The API server no longer has the requested resourceVersion (410 Gone): re-list."""


@dataclass(slots=True)
class ApiServer:
    """Where the API server is and how to authenticate to it."""

    host: str
    ssl_context: ssl.SSLContext | bool
    config: Any  # kubernetes.client.Configuration: keeps its token-refresh hook

    def headers(self) -> dict[str, str]:
        """Auth headers, refreshing a rotating token first (service-account and exec tokens expire)."""
        hook = getattr(self.config, "refresh_api_key_hook", None)
        if hook is not None:
            hook(self.config)
        token = (self.config.api_key or {}).get("authorization") or (self.config.api_key or {}).get(
            "BearerToken"
        )
        if not token:
            return {}
        return {"Authorization": token if token.lower().startswith("bearer ") else f"Bearer {token}"}

    def client(self, *, read_timeout: float, timeout: float = 10.0) -> httpx.AsyncClient:
        auth = None
        if self.config.username and self.config.password:
            auth = httpx.BasicAuth(self.config.username, self.config.password)
        return httpx.AsyncClient(
            base_url=self.host,
            verify=self.ssl_context,
            auth=auth,
            timeout=httpx.Timeout(timeout, read=read_timeout),
        )


def load_api_server(kubeconfig: Path | None = None, context: str | None = None) -> ApiServer:
    """In-cluster credentials when running in a pod (and no kubeconfig is named), else kubeconfig.

    Blocking (file I/O, maybe an exec plugin): call it with ``asyncio.to_thread``.
    """
    cfg = kclient.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        kconfig.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        kconfig.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig) if kubeconfig else None,
            context=context,
            client_configuration=cfg,
            persist_config=False,
        )
    return ApiServer(host=cfg.host.rstrip("/"), ssl_context=_ssl_context(cfg), config=cfg)


def _ssl_context(cfg: Any) -> ssl.SSLContext | bool:
    if not cfg.host.startswith("https://"):
        return False
    ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None)
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
    if not cfg.verify_ssl:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def default_namespace() -> str:
    """The pod's own namespace when in a cluster, else ``default``."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def pods_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{quote(namespace, safe='')}/pods"


async def list_pods(
    http: httpx.AsyncClient,
    api: ApiServer,
    namespace: str,
    label_selector: str,
    *,
    page_size: int = 500,
) -> dict[str, Any]:
    """All matching pods as one PodList body (pages joined; resourceVersion of the list)."""
    items: list[Any] = []
    params: dict[str, str | int] = {"limit": page_size}
    if label_selector:
        params["labelSelector"] = label_selector
    while True:
        resp = await http.get(pods_path(namespace), params=params, headers=api.headers())
        resp.raise_for_status()
        body = resp.json()
        items.extend(body.get("items") or [])
        cont = (body.get("metadata") or {}).get("continue")
        if not cont:
            return {"items": items, "metadata": {"resourceVersion": body["metadata"]["resourceVersion"]}}
        params["continue"] = cont


async def watch_pods(
    http: httpx.AsyncClient,
    api: ApiServer,
    namespace: str,
    label_selector: str,
    resource_version: str,
    *,
    timeout_seconds: int,
) -> AsyncIterator[Mapping[str, Any]]:
    """Stream watch events from ``resource_version`` until the server ends the watch.

    Raises :class:`WatchExpired` when the server answers 410 Gone up front (it may also send an
    ``ERROR`` event with code 410 inside the stream; :func:`..pods.apply_event` handles that).
    """
    params: dict[str, str | int] = {
        "watch": 1,
        "resourceVersion": resource_version,
        "allowWatchBookmarks": "true",
        "timeoutSeconds": timeout_seconds,
    }
    if label_selector:
        params["labelSelector"] = label_selector
    async with http.stream("GET", pods_path(namespace), params=params, headers=api.headers()) as resp:
        if resp.status_code == 410:
            raise WatchExpired(f"resourceVersion {resource_version} is gone")
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.strip():
                event = json.loads(line)
                if not isinstance(event, dict):
                    raise ValueError(f"watch line is not an object: {line[:80]!r}")
                yield event
